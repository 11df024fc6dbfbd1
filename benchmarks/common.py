"""What the search benchmarks share: a teacher trained once in a temporary folder, the data,
and a quiet local Ray instance sized to the search section."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import ray

from casd_ray.artifacts.network import Network, load_network
from casd_ray.config import ExperimentConfig, SearchConfig
from casd_ray.config_file import load_config
from casd_ray.data.load import load_dataset
from casd_ray.data.splits import DataSplits
from casd_ray.pipeline.run import execute
from casd_ray.search.run import run_search
from casd_ray.search.trial_plan import trial_plan

SMOKE = [
    "teacher.epochs=1",
    "data.train_subset=2000",
    "search.train_subset=1000",
    "search.num_samples=6",
    "search.max_epochs=2",
]


def config_parser(doc: str, smoke_help: str = "tiny sizes") -> argparse.ArgumentParser:
    """The arguments every config-driven benchmark takes: CONFIG, --set, --smoke-test."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("config", nargs="?", default="experiments/quick.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--smoke-test", action="store_true", help=smoke_help)
    return parser


def prepare(
    config: str, overrides: list[str], prefix: str
) -> tuple[ExperimentConfig, DataSplits, Network, Path]:
    """(config, data, teacher, output folder): the config's teacher trained in a temp folder."""
    out = Path(tempfile.mkdtemp(prefix=prefix))
    cfg = load_config(config, [*overrides, f"output_dir={out}", "name=teacher"])
    execute(cfg, ["teacher"], log=print)
    data = load_dataset(cfg.data, cfg.seed)
    print(f"data: {len(data.y_train)} train images; runs in {out}")
    return cfg, data, load_network(cfg.run_dir / "teacher"), out


def start_ray(cfg: ExperimentConfig) -> None:
    """A local instance with exactly the CPUs the search's concurrent trials use."""
    ray.init(
        address="local",
        num_cpus=int(cfg.search.max_concurrent * cfg.search.cpus_per_trial),
        log_to_driver=False,
        logging_level=logging.WARNING,
    )


def search(
    cfg: ExperimentConfig, data: DataSplits, teacher: Network, s: SearchConfig, run_dir: Path, **kw
) -> Path:
    """One fresh search with search section ``s`` into ``run_dir`` (``kw``: log, trainable)."""
    return run_search(
        data,
        teacher,
        search_cfg=s,
        plan=trial_plan(cfg.space, cfg.distill, s, cfg.seed),
        run_dir=run_dir,
        resume=False,
        **{"log": lambda _: None, **kw},
    )
