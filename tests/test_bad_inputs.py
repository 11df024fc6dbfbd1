"""Bad input through the real command line: one line on stderr naming the field or file,
exit code 2, no traceback, and nothing written.

``python tests/test_bad_inputs.py`` prints the same cases as a Markdown table (input, exit
code, the line a user sees).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from conftest import write_fake_fashion_mnist  # noqa: E402

from casd_ray.cli import main

# (what, command, extra config keys as dotted YAML overrides or raw text, needle)
# {data}/{tmp} are filled in per test; "text:" replaces the config file's content.
CASES: list[tuple[str, list[str], str]] = [
    ("config file missing", ["run", "{tmp}/missing.yaml"], "config file not found"),
    ("config not YAML", ["run", "text:a: [1\n"], "not valid YAML"),
    ("config empty", ["run", "text:"], "the config file is empty"),
    ("config is a list", ["run", "text:- 1\n"], "expected a mapping"),
    ("config not text", ["run", "bytes:"], "cannot read the config"),
    ("unknown top-level key", ["run", "--set", "epochs=3"], "epochs: unknown key"),
    ("typo in a key", ["run", "--set", "search.max_epoch=3"], "search.max_epoch: unknown key"),
    ("name with a path", ["run", "--set", "name=../../x"], "name: must be a plain folder"),
    ("name '.'", ["run", "--set", "name=."], "name: must be a plain folder"),
    ("name empty", ["run", "--set", "name="], "name:"),
    ("seed not a number", ["run", "--set", "seed=abc"], "seed:"),
    ("unknown dataset", ["run", "--set", "data.dataset=mnist"], "data.dataset:"),
    ("val_size 0", ["run", "--set", "data.val_size=0"], "data.val_size:"),
    ("negative train_subset", ["run", "--set", "data.train_subset=-5"], "data.train_subset:"),
    ("unknown architecture", ["run", "--set", "model.arch=resnet7"], "model.arch: unknown"),
    ("width 0", ["run", "--set", "model.width=0"], "model.width:"),
    ("unknown source prefix", ["run", "--set", "model.arch=keras:resnet50"], "model.arch:"),
    (
        "unknown torchvision model",
        ["run", "--set", "model.arch=torchvision:resnet7"],
        "model.arch: torchvision has no model 'resnet7'",
    ),
    ("unknown timm model", ["run", "--set", "model.arch=timm:nonet"], "timm has no model"),
    ("python source without callable", ["run", "--set", "model.arch=python:m.py"], "model.arch:"),
    (
        "factory file missing",
        ["run", "--set", "model.arch=python:{tmp}/net.py:make"],
        "model.arch: {tmp}/net.py does not exist",
    ),
    (
        "factory rejects kwargs",
        ["run", "--set", "model.arch=torchvision:resnet18", "--set", "model.kwargs={{bogus: 1}}"],
        "model.kwargs: torchvision:resnet18 failed to build",
    ),
    (
        "model does not fit the images",
        ["run", "--set", "model.arch=torchvision:resnet18"],
        "model.arch: torchvision:resnet18 fails on the data's 1x28x28 images",
    ),
    ("ignore on a built-in ResNet", ["run", "--set", "space.ignore=[stem]"], "space.ignore:"),
    ("image_size for CIFAR-like data", ["run", "--set", "data.image_size=32"], "data.image_size"),
    ("negative epochs", ["teacher", "--set", "teacher.epochs=-1"], "teacher.epochs:"),
    ("learning rate 0", ["teacher", "--set", "teacher.lr=0"], "teacher.lr:"),
    ("momentum 1.5", ["teacher", "--set", "teacher.momentum=1.5"], "teacher.momentum:"),
    ("unknown granularity", ["run", "--set", "space.granularity=channel"], "space.granularity:"),
    (
        "min_ratio above max_ratio",
        ["run", "--set", "space.min_ratio=0.9", "--set", "space.max_ratio=0.5"],
        "min_ratio must be <= max_ratio",
    ),
    ("budget above 1", ["run", "--set", "space.budget.target=1.5"], "space.budget.target:"),
    ("budget 0", ["run", "--set", "space.budget.target=0"], "space.budget.target:"),
    ("unknown budget metric", ["run", "--set", "space.budget.metric=energy"], "budget.metric:"),
    (
        "unknown latency runtime",
        [
            "run",
            "--set",
            "space.budget.metric=latency",
            "--set",
            "space.budget.latency.runtime=tvm",
        ],
        "space.budget.latency.runtime:",
    ),
    (
        "latency target below the fastest network",
        [
            "run",
            "--set",
            "space.budget.metric=latency",
            "--set",
            "space.budget.latency.runtime=torch",
            "--set",
            "space.budget.latency.target_ms=0.000001",
            "--set",
            "space.budget.latency.min_run_time=0.02",
        ],
        "space.budget.target: 0.000 ms is below the fastest reachable network",
    ),  # fmt: skip
    (
        "latency budget with NSGA-II",
        ["run", "--set", "space.budget.metric=latency", "--set", "search.algorithm=optuna-nsga2"],
        "search.algorithm: optuna-nsga2 trades accuracy against FLOPs",
    ),
    ("unknown importance", ["run", "--set", "space.importance=random"], "space.importance:"),
    ("temperature 0", ["run", "--set", "distill.temperature=0"], "distill.temperature:"),
    ("alpha 2", ["run", "--set", "distill.alpha=2"], "distill.alpha:"),
    ("unknown searcher", ["run", "--set", "search.algorithm=bayes"], "search.algorithm:"),
    ("no trials", ["run", "--set", "search.num_samples=0"], "search.num_samples:"),
    ("reduction factor 1", ["run", "--set", "search.reduction_factor=1"], "reduction_factor:"),
    ("unknown scheduler", ["run", "--set", "search.scheduler=pbt"], "search.scheduler:"),
    ("negative GPUs", ["run", "--set", "search.gpus_per_trial=-1"], "search.gpus_per_trial:"),
    ("no fine-tune epochs", ["run", "--set", "finetune.epochs=0"], "finetune.epochs:"),
    ("--set without '='", ["run", "--set", "search.max_epochs"], "expected key=value"),
    ("--set value not YAML", ["run", "--set", "space.ignore=[stem"], "--set space.ignore"),
    ("--set list for a number", ["run", "--set", "search.num_samples=[1"], "search.num_samples:"),
    ("--set bool for a number (D15)", ["run", "--set", "search.num_samples=true"], "num_samples:"),
    ("negative seed (D6)", ["run", "--set", "seed=-1"], "seed: "),
    ("seed of 2**64 (D6)", ["run", "--set", "seed=18446744073709551616"], "seed: "),
    ("split_seed -1 (D6)", ["run", "--set", "data.split_seed=-1"], "data.split_seed: "),
    (
        "duplicate YAML key (D8)",
        ["run", "text:search:\n  num_samples: 2\nsearch:\n  max_epochs: 1\n"],
        "duplicate key 'search' (line 3)",
    ),
    ("--set into a value", ["run", "--set", "name.x=1"], "name.x: name is not a section"),
    ("more CPUs than here", ["run", "--set", "search.cpus_per_trial=999"], "cpus_per_trial"),
    (
        "unreachable budget",
        ["run", "--set", "space.budget.target=0.0001"],
        "space.budget.target: 0.0001 is below the smallest reachable",
    ),
    ("data folder missing", ["run", "--set", "data.root={tmp}/nowhere"], "nowhere"),
    ("data root is a file", ["run", "--set", "data.root={tmp}/c.yaml"], "c.yaml"),
    ("output_dir is a file", ["run", "--set", "output_dir={tmp}/c.yaml"], "output_dir:"),
    (
        "output_dir on a pseudo-filesystem (D13)",
        ["run", "--set", "output_dir=/proc/casd-ray-runs"],
        "output_dir: /proc is not writable",
    ),
    (
        "storage_path of an unknown scheme (D14)",
        ["run", "--set", "search.storage_path=foo://x"],
        "search.storage_path: foo://x",
    ),
    (
        "storage_path on a pseudo-filesystem (D14)",
        ["run", "--set", "search.storage_path=/proc/casd-ray-search"],
        "search.storage_path: /proc is not writable",
    ),
    (
        "teacher checkpoint missing",
        ["run", "--set", "teacher.checkpoint={tmp}/none.pt"],
        "teacher.checkpoint:",
    ),
    (
        "teacher checkpoint garbage",
        ["run", "--set", "teacher.checkpoint={tmp}/garbage.pt"],
        "teacher.checkpoint:",
    ),
    (
        "one-class image folder (D3)",
        ["run", "--set", "data.dataset=imagefolder", "--set", "data.root={tmp}/one_class"],
        "1 class (cat); a classifier needs at least 2",
    ),
    (
        "typo in space.ignore (D7)",
        ["run", "--set", "model.arch=python:{tmp}/tiny_net.py:Net", "--set", "space.ignore=[bdy]"],
        "space.ignore: python:{tmp}/tiny_net.py:Net has no module 'bdy'; did you mean 'body'?",
    ),
    (
        "nothing left to prune (D5)",
        ["run", "--set", "model.arch=python:{tmp}/tiny_net.py:Net", "--set", "space.ignore=[body]"],
        "model.arch: python:{tmp}/tiny_net.py:Net has no channel group that can be pruned",
    ),
    (
        "nothing left to prune at budget 1.0 (D5)",
        [
            "run",
            "--set",
            "model.arch=python:{tmp}/tiny_net.py:Net",
            "--set",
            "space.ignore=[body]",
            "--set",
            "space.budget.target=1.0",
        ],
        "has no channel group that can be pruned",
    ),  # fmt: skip
    ("--fresh of a stage not run", ["teacher", "--fresh", "search"], "--fresh search"),
    ("search before a teacher", ["search"], "needs a finished teacher"),
    ("fine-tune before a search", ["finetune"], "needs a finished teacher"),
    ("report of no folder", ["report", "{tmp}/nowhere"], "run folder not found"),
    ("report of a non-run folder", ["report", "{data}"], "config.yaml: not found"),
    ("report with a damaged data.json (D11)", ["report", "{tmp}/damaged"], "data.json: expected"),
]


TINY_NET = """
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.body(x))
"""


def _inputs(tmp: Path) -> None:
    """Files some cases point at: a small factory, a one-class image folder, a run folder
    whose teacher/data.json is damaged."""
    from PIL import Image

    (tmp / "tiny_net.py").write_text(TINY_NET)
    for split in ("train", "test"):
        folder = tmp / "one_class" / split / "cat"
        folder.mkdir(parents=True)
        for i in range(6):
            Image.new("L", (8, 8), 20 * i).save(folder / f"{i}.png")
    (tmp / "damaged" / "teacher").mkdir(parents=True)
    (tmp / "damaged" / "config.yaml").write_text("name: damaged\n")
    (tmp / "damaged" / "teacher" / "data.json").write_text("[1, 2]")


def _config(tmp: Path, data: Path) -> Path:
    raw = {
        "name": "bad",
        "output_dir": str(tmp / "runs"),
        "data": {"dataset": "fashion_mnist", "root": str(data), "val_size": 20},
        "model": {"arch": "resnet8", "width": 4},
        "teacher": {"epochs": 1},
        "search": {"num_samples": 2, "max_epochs": 1},
    }
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    (tmp / "garbage.pt").write_bytes(b"not a checkpoint")
    _inputs(tmp)
    return path


def _argv(args: list[str], tmp: Path, data: Path) -> list[str]:
    config = _config(tmp, data)
    out = [a.format(tmp=tmp, data=data) for a in args]
    if out[0] == "report":
        return out
    if len(out) > 1 and out[1].startswith(("text:", "bytes:")):
        if out[1].startswith("text:"):
            config.write_text(out[1][5:])
        else:
            config.write_bytes(b"\xff\xfe\x00binary")
        return [out[0], str(config)]
    if len(out) > 1 and out[1].endswith(".yaml"):
        return out
    return [out[0], str(config), *out[1:]]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("bad") / "data", n=60, n_test=20)


@pytest.mark.parametrize("what, args, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path, data, capsys, what, args, needle
):
    code = main(_argv(args, tmp_path, data))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("casd-ray: error: ") and "\n" not in err, err
    assert needle.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "runs").exists()  # nothing written


def table() -> str:
    """The cases as a Markdown table of what a user sees (run outside pytest)."""
    import contextlib
    import io
    import tempfile

    rows = ["| # | bad input | exit | stderr |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as d:
        data = write_fake_fashion_mnist(Path(d) / "data", n=60, n_test=20)
        for i, (what, args, _) in enumerate(CASES, 1):
            tmp = Path(d) / f"case{i}"
            tmp.mkdir()
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(_argv(args, tmp, data))
            line = err.getvalue().strip().replace(d, "$TMP").replace("|", "\\|")
            rows.append(f"| {i} | {what} | {code} | `{line}` |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
