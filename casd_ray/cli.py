"""`casd-ray` command line: one subcommand per pipeline stage, plus `run` for all of them.

Every stage reuses what an earlier run finished, so `casd-ray run` after an interruption only
does what is left. Bad input (config, data, budget) ends with one line naming the field or
file and exit code 2; nothing already written is touched.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from casd_ray.config import ConfigError, ExperimentConfig, load_config, save_config


def _log(msg: str) -> None:
    print(f"[casd-ray {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input: reported as one line, not a traceback."""
    from casd_ray.data import DataError
    from casd_ray.finetune import SelectionError
    from casd_ray.space import BudgetError

    return (ConfigError, DataError, BudgetError, SelectionError, FileNotFoundError)


def _load(args: argparse.Namespace) -> ExperimentConfig:
    cfg = load_config(args.config, args.set)
    save_config(cfg, cfg.run_dir / "config.yaml")
    return cfg


def cmd_teacher(args: argparse.Namespace) -> None:
    from casd_ray.teacher import ensure_teacher

    cfg = _load(args)
    _log(f"stage teacher: {cfg.model.arch} on {cfg.data.dataset}")
    art = ensure_teacher(cfg, log=_log)
    _log(f"teacher ready at {art.path}: {art.metrics}")


def cmd_search(args: argparse.Namespace) -> None:
    from casd_ray.search import run_search

    cfg = _load(args)
    _log(f"stage search: {cfg.search.algorithm}, {cfg.search.num_samples} trials")
    path = run_search(
        cfg, address=args.address, dashboard=args.dashboard, resume=args.resume, log=_log
    )
    _log(f"trials table: {path}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from casd_ray.finetune import run_finetune

    cfg = _load(args)
    _log("stage finetune: winner and uniform baseline")
    run_finetune(cfg, log=_log)


def cmd_report(args: argparse.Namespace) -> None:
    from casd_ray.report import build_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run folder not found")
    _log(f"report written: {build_report(run_dir)}")


def cmd_run(args: argparse.Namespace) -> None:
    from casd_ray.finetune import run_finetune
    from casd_ray.report import build_report
    from casd_ray.search import run_search
    from casd_ray.teacher import ensure_teacher

    cfg = _load(args)
    stages = ["teacher", "search", "finetune", "report"]
    _log(f"stage 1/{len(stages)} teacher")
    ensure_teacher(cfg, log=_log)
    _log(f"stage 2/{len(stages)} search")
    run_search(cfg, address=args.address, dashboard=args.dashboard, resume=True, log=_log)
    _log(f"stage 3/{len(stages)} finetune")
    run_finetune(cfg, log=_log)
    _log(f"stage 4/{len(stages)} report")
    _log(f"report written: {build_report(cfg.run_dir)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="casd-ray",
        description="Compress a CNN by channel-width search with distillation, on Ray Tune.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, func, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("config", help="experiment YAML (see experiments/)")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config field, e.g. --set search.num_samples=8 (repeatable)",
        )
        p.set_defaults(func=func)
        return p

    def with_cluster(p: argparse.ArgumentParser) -> None:
        p.add_argument("--address", default=None, help="join a running Ray cluster (auto|ray://…)")
        p.add_argument(
            "--dashboard",
            action="store_true",
            help="start the local Ray dashboard on 127.0.0.1 (token auth stays on)",
        )

    with_config("teacher", cmd_teacher, "train (or reuse) the teacher")
    search = with_config("search", cmd_search, "run the width search on Ray Tune")
    with_cluster(search)
    search.add_argument("--resume", action="store_true", help="continue an interrupted search")
    with_config("finetune", cmd_finetune, "prune and fine-tune the winner and uniform baseline")
    run = with_config("run", cmd_run, "teacher -> search -> finetune -> report")
    with_cluster(run)
    report = sub.add_parser("report", help="rebuild report.md/json and plots from a run folder")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except _user_errors() as err:
        print(f"casd-ray: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("casd-ray: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
