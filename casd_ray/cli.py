"""`casd-ray` command line: one subcommand per pipeline stage, plus `run` for all of them.

The commands only parse arguments and hand over to :mod:`casd_ray.pipeline.run`, which checks
everything before writing anything and decides what a rerun reuses. Every failure ends with
one line on stderr and a non-zero exit code: 2 for bad input (config, data, budget, a run
folder that does not match), 1 for anything unexpected (the traceback with ``--debug``),
130 after Ctrl-C and 143 after SIGTERM, with the command that resumes.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from casd_ray import __version__
from casd_ray.config_file import load_config
from casd_ray.errors import ConfigError, UserError
from casd_ray.pipeline.plan import STAGES


def _log(msg: str) -> None:
    print(f"[casd-ray {time.strftime('%H:%M:%S')}] {msg}", flush=True)


COMMAND_STAGES = {
    "teacher": ["teacher"],
    "search": ["search"],
    "finetune": ["finetune"],
    "audit": ["audit"],
    "run": list(STAGES),
}


def cmd_stages(args: argparse.Namespace) -> None:
    from casd_ray.pipeline.run import execute  # lazy: torch and ray only for a real run

    stages = COMMAND_STAGES[args.command]
    if args.fresh and args.fresh not in stages:
        raise ConfigError(
            f"--fresh {args.fresh}: `casd-ray {args.command}` does not run that stage"
        )
    cfg = load_config(args.config, args.set)
    execute(
        cfg,
        stages,
        fresh=args.fresh,
        address=getattr(args, "address", None),
        dashboard=getattr(args, "dashboard", False),
        trust_folder=args.trust_run_folder,
        log=_log,
    )


def cmd_compare(args: argparse.Namespace) -> None:
    from casd_ray.study.compare import compare

    if args.fresh:
        raise ConfigError("--fresh: not for compare; it reuses (or runs) each seed's run")
    cfg = load_config(args.config, args.set)
    path = compare(cfg, args.seeds, log=_log)
    _log(f"comparison written: {path}")
    print(path.read_text(), end="")


def cmd_report(args: argparse.Namespace) -> None:
    from casd_ray.pipeline.run import report

    _log(f"report written: {report(Path(args.run_dir))}")


# subcommand -> (what it does, an example), shown by `casd-ray <command> --help`
HELP = {
    "teacher": (
        "Train the network to compress (or import teacher.checkpoint) into RUN/teacher/; "
        "a rerun reuses it.",
        "casd-ray teacher experiments/quick.yaml --set teacher.epochs=5",
    ),
    "search": (
        "Run the width search on Ray Tune (each trial distils one candidate from the "
        "teacher); an interrupted search resumes where it stopped.",
        "casd-ray search experiments/quick.yaml --set search.num_samples=8",
    ),
    "finetune": (
        "Prune the winner and the uniform baseline from the teacher, fine-tune both with "
        "distillation and export them (winner/, uniform/).",
        "casd-ray finetune experiments/quick.yaml --set finetune.epochs=3",
    ),
    "audit": (
        "Fine-tune the search's top trials with the final recipe and rank-correlate their "
        "search scores with the final accuracy (the proxy-fidelity audit).",
        "casd-ray audit experiments/quick.yaml --set audit.top_k=3 --fresh audit",
    ),
    "run": (
        "Every stage in order: teacher -> search -> finetune -> audit -> report. Finished "
        "stages with the same settings are reused, interrupted ones resumed.",
        "casd-ray run experiments/quick.yaml --set name=try2",
    ),
    "compare": (
        "Winner vs uniform width, random search and global channel ranking, over several "
        "seeds (one run folder per seed).",
        "casd-ray compare experiments/quick.yaml --seeds 0 1 2",
    ),
    "report": (
        "Rebuild report.md, report.json and the plots from a run folder's files alone "
        "(recomputes nothing).",
        "casd-ray report runs/quick",
    ),
}


def cmd_data(args: argparse.Namespace) -> None:
    from casd_ray.stream import pack, shards  # lazy: pyarrow only for these commands

    if args.data_command == "pack":
        out = pack.pack(args.src, args.dst, shard_rows=args.shard_rows,
                        image_size=args.image_size, shard_format=args.format,
                        log=_log)  # fmt: skip
    else:
        out = shards.verify(args.dst, log=lambda _: None)
    for split, counts in out["counts"].items():
        _log(f"{split}: {sum(counts.values())} images, per class {counts}")
    _log(f"checksum {out['checksum']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="casd-ray",
        description="Compress a CNN by channel-width search with distillation, on Ray Tune.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    parser.add_argument("--version", action="version", version=f"casd-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        description, example = HELP[name]
        return sub.add_parser(
            name,
            help=help_,
            description=description,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        p = add(name, help_)
        p.add_argument("config", help="experiment YAML (see experiments/)")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config field, e.g. --set search.num_samples=8 (repeatable)",
        )
        p.add_argument(
            "--fresh",
            choices=STAGES[:-1],
            default=None,
            help="redo this stage and every later one (old outputs move to previous/)",
        )
        p.add_argument(
            "--trust-run-folder",
            action="store_true",
            help="resume a search whose Tune state this user's key did not sign",
        )
        p.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
        p.set_defaults(func=cmd_stages)
        return p

    def with_cluster(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--address",
            default=None,
            help="join a running Ray cluster (auto|ray://…, or RAY_ADDRESS); default: a local Ray",
        )
        p.add_argument(
            "--dashboard",
            action="store_true",
            help="start the local Ray dashboard on 127.0.0.1 (token auth stays on)",
        )

    with_config("teacher", "train (or reuse) the teacher")
    search = with_config("search", "run (or resume) the width search on Ray Tune")
    with_cluster(search)
    search.add_argument("--resume", action="store_true", help="(default; kept for old scripts)")
    with_config("finetune", "prune and fine-tune the winner and uniform baseline")
    with_config("audit", "fine-tune the top trials to check the search's ranking")
    run = with_config("run", "teacher -> search -> finetune -> audit -> report")
    with_cluster(run)
    compare = with_config(
        "compare", "winner vs uniform, random search and global ranking over seeds"
    )
    compare.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED")
    compare.set_defaults(func=cmd_compare)
    report = add("report", "rebuild report.md/json and plots from a run folder")
    report.add_argument("run_dir", help="a run folder (output_dir/name)")
    report.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    report.set_defaults(func=cmd_report)
    data = sub.add_parser("data", help="pack an image folder into shards that stream; verify")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    pack = data_sub.add_parser(
        "pack", help="SRC/{train,test}/<class>/* -> Parquet (or WebDataset tar) shards"
    )
    pack.add_argument("src")
    pack.add_argument("dst", help="an empty folder (or the folder of an interrupted pack)")
    pack.add_argument("--shard-rows", type=int, default=2048, help="images per shard")
    pack.add_argument(
        "--image-size", type=int, default=None, help="resize (shorter side) and centre-crop"
    )
    pack.add_argument(
        "--format",
        choices=("parquet", "webdataset"),
        default="parquet",
        help="webdataset: <split>-NNNNN.tar with <row>.cls + <row>.png|jpg per image",
    )
    verify = data_sub.add_parser("verify", help="check shards against their manifest")
    verify.add_argument("dst", help="a packed folder or s3:// URI")
    for p in (pack, verify):
        p.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
        p.set_defaults(func=cmd_data)
    return parser


_SIGNALLED: list[int] = []


def _on_sigterm(signum, frame) -> None:
    # Handled like Ctrl-C: during a search Ray Tune's SIGINT handler stops it gracefully
    # (saving its state); elsewhere KeyboardInterrupt at a safe point of our own code. Not
    # by raising SIGINT: a script's background job (`cmd &`) inherits SIGINT ignored, and
    # SIGTERM, what schedulers and `kill` send, was then swallowed.
    _SIGNALLED.append(signum)
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):  # Tune's, or Python's default (raises KeyboardInterrupt)
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args.func(args)
    except KeyboardInterrupt as err:
        code = 143 if _SIGNALLED else 130
        what = _one_line(err) if str(err) else "interrupted"
        print(
            f"casd-ray: {what}; resume with: casd-ray {shlex.join(argv)}",
            file=sys.stderr,
        )
        return code
    except UserError as err:  # caused by the user's input or files: one line
        if args.debug:
            raise
        print(f"casd-ray: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, no traceback
        if args.debug:
            raise
        print(
            f"casd-ray: error: {type(err).__name__}: {_one_line(err)[:300]} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
