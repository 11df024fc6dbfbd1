"""Screenshots of the Ray dashboard while a search runs, logged in with the auth token.

Starts a local Ray instance with its dashboard (token authentication on, as Ray 2.60 does by
default), submits a small ``casd-ray run`` as a Ray job (the way a cluster user runs it:
``ray job submit -- casd-ray run CONFIG --address auto``), waits until trial actors are
alive, and photographs the Jobs and Actors pages with headless Chromium (Debian's
``chromium`` package). The browser gets the token the way a user's browser would carry it: an
``Authorization: Bearer`` header on every request (set through the DevTools protocol).

    python benchmarks/dashboard_screenshot.py [--out benchmarks/figures] [--smoke-test]

Writes ``dashboard-jobs.png`` and ``dashboard-actors.png`` (the images in the README). Uses
the quick experiment on Fashion-MNIST (``make data``), shrunk to a minute of work.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import ray

ROOT = Path(__file__).resolve().parent.parent
PAGES = {"jobs": "#/jobs", "actors": "#/actors"}
TRIAL = "distill_trial"  # the trainable's name: each trial actor's repr in the dashboard


def token() -> str:
    """Ray 2.60's token: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return Path(path).read_text().strip()


def api(url: str) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token()}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit_search(dashboard: str, out_dir: Path, smoke: bool) -> str:
    """``casd-ray run experiments/quick.yaml`` as a Ray job, shrunk; returns the job id."""
    from ray.job_submission import JobSubmissionClient

    sets = {
        "name": "dashboard",
        "output_dir": str(out_dir),
        "teacher.epochs": 1,
        "data.train_subset": 2000 if smoke else 6000,
        "search.num_samples": 4,
        "search.max_epochs": 2 if smoke else 4,
        "finetune.epochs": 1,
        "audit.top_k": 0,
    }
    args = " ".join(f"--set {k}={v}" for k, v in sets.items())
    client = JobSubmissionClient(dashboard, headers={"Authorization": f"Bearer {token()}"})
    config = ROOT / "experiments" / "quick.yaml"
    return client.submit_job(
        entrypoint=f"{sys.executable} -m casd_ray.cli run {config} {args} --address auto"
    )


def wait_for_trials(dashboard: str, job: str, timeout: float = 300) -> int:
    """Wait until trial actors (``repr_name`` is the trainable's name) are alive."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(dashboard, headers={"Authorization": f"Bearer {token()}"})
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = api(f"{dashboard}/api/v0/actors?detail=1&limit=1000")["data"]["result"]["result"]
        alive = [a for a in rows if a.get("state") == "ALIVE" and a.get("repr_name") == TRIAL]
        if alive:
            return len(alive)
        if client.get_job_status(job).is_terminal():
            tail = client.get_job_logs(job)[-2000:]
            raise SystemExit(f"job {job} ended ({client.get_job_status(job)}):\n{tail}")
        time.sleep(2)
    raise TimeoutError(f"no trial actor came up; job {job} is {client.get_job_status(job)}")


async def _screenshots(port: int, dashboard: str, out: Path, wait_s: float) -> list[Path]:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        for _ in range(50):  # the browser's DevTools endpoint takes a moment to come up
            try:
                async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                    targets = await r.json()
                break
            except aiohttp.ClientError:
                await asyncio.sleep(0.2)
        page = next(t for t in targets if t["type"] == "page")
        async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            ids = iter(range(1, 10_000))

            async def call(method: str, **params) -> dict:
                i = next(ids)
                await ws.send_json({"id": i, "method": method, "params": params})
                async for msg in ws:
                    data = json.loads(msg.data)
                    if data.get("id") == i:
                        return data.get("result", {})
                return {}

            await call("Network.enable")
            headers = {"Authorization": f"Bearer {token()}"}
            await call("Network.setExtraHTTPHeaders", headers=headers)
            await call("Page.enable")
            written = []
            for name, fragment in PAGES.items():
                await call("Page.navigate", url=f"{dashboard}/{fragment}")
                await asyncio.sleep(wait_s)  # the dashboard polls its API every few seconds
                shot = await call("Page.captureScreenshot", format="png")
                path = out / f"dashboard-{name}.png"
                path.write_bytes(base64.b64decode(shot["data"]))
                written.append(path)
            return written


def screenshots(dashboard: str, out: Path, wait_s: float = 8.0) -> list[Path]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="casd-chromium-") as profile:
        proc = subprocess.Popen(
            [
                browser, "--headless=new", "--no-sandbox", "--disable-gpu",
                f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
                "--window-size=1500,950", "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            return asyncio.run(_screenshots(port, dashboard, out, wait_s))
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "figures")
    ap.add_argument("--smoke-test", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1")
    dashboard = f"http://{ctx.dashboard_url}"
    try:
        with tempfile.TemporaryDirectory(prefix="casd-dashboard-") as runs:
            job = submit_search(dashboard, Path(runs), args.smoke_test)
            print(f"submitted job {job}; waiting for trial actors")
            print(f"{wait_for_trials(dashboard, job)} trial actors alive")
            for path in screenshots(dashboard, args.out):
                print(f"wrote {path}")
            from ray.job_submission import JobSubmissionClient

            client = JobSubmissionClient(dashboard, headers={"Authorization": f"Bearer {token()}"})
            client.stop_job(job)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
