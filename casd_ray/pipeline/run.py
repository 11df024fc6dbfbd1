"""The pipeline: stage order, what each stage needs, and the one place that decides reuse.

Stages (teacher -> search -> finetune -> report) are functions of the previous stage's
artefacts and their own config section; this module calls them in order. Each stage has a
*fingerprint*: the settings that determine its result (plus the fingerprint of the stage
before it). ``stages.json`` in the run folder records, per stage, the fingerprint it was
started with and whether it finished. On a rerun a stage is

* reused when it finished with the same fingerprint,
* resumed when it was interrupted with the same fingerprint,
* refused when the fingerprint differs: one line names the differing keys and says what to
  do (a new ``name``, or ``--fresh STAGE`` to redo that stage and every later one; the old
  outputs are moved under ``previous/``, never deleted).

Settings that do not change a result (``search.max_concurrent``, ``search.max_failures``,
``search.cpus_per_trial``) are not part of any fingerprint. Nothing is written before the
whole command is checked: schema, output folder, fingerprints, resources, data, budget and
the pre-flight check of the model's candidates (:mod:`casd_ray.widths.preflight`); only
then ``config.yaml`` and the stage records are written.
"""

from __future__ import annotations

import functools
from functools import partial
from pathlib import Path

from torch import nn

from casd_ray.artifacts.network import load_network, verify_export
from casd_ray.artifacts.run_folder import PARTS, SUMMARY, read_summary
from casd_ray.artifacts.trials import TRIALS_FILE, read_trials
from casd_ray.config import ExperimentConfig
from casd_ray.config_file import save_config
from casd_ray.data.splits import DataSplits
from casd_ray.errors import ArtifactError, ConfigError
from casd_ray.files import check_writable, read_json, write_json
from casd_ray.models.family import with_ignore
from casd_ray.pipeline.latency import save_latency, saved_latency, with_latency
from casd_ray.pipeline.plan import (
    STAGES,
    TRAINED,
    Log,
    Plan,
    fingerprints,
    mark_stage,
    plan,
    set_aside_outputs,
)
from casd_ray.pipeline.stages.audit import run_audit
from casd_ray.pipeline.stages.finetune import run_finetune
from casd_ray.pipeline.stages.teacher import load_checkpoint, make_teacher, teacher_spec
from casd_ray.report.build import build_report
from casd_ray.search.run import rebuild_table, run_search
from casd_ray.search.session import check_resources
from casd_ray.search.storage import check_storage
from casd_ray.search.trial_plan import trial_plan
from casd_ray.stream.load import load_data
from casd_ray.widths import space
from casd_ray.widths.preflight import preflight

__all__ = ["STAGES", "execute", "fingerprints", "load_teacher", "report"]

# --------------------------------------------------------------------------- checks


def check_output(cfg: ExperimentConfig) -> None:
    """The run folder can be created and written (nothing is created here)."""
    out, run = Path(cfg.output_dir), cfg.run_dir
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} exists and is not a folder")
    if run.exists() and not run.is_dir():
        raise ConfigError(f"name: {run} exists and is not a folder")
    check_writable(run, "output_dir")


# --------------------------------------------------------------------------- execute


def execute(
    cfg: ExperimentConfig,
    stages: list[str],
    *,
    fresh: str | None = None,
    address: str | None = None,
    dashboard: bool = False,
    trust_folder: bool = False,
    log: Log = print,
    data: DataSplits | None = None,
    teacher_model: nn.Module | None = None,
) -> Path:
    """Check everything, then run ``stages`` in order; returns the run folder.

    ``data``: the splits already in memory (the Python API), instead of loading ``cfg.data``;
    ``teacher_model``: a trained network to use as the teacher instead of training one.
    """
    check_output(cfg)
    p = plan(cfg, [s for s in stages if s != "report"], fresh)
    run_dir = cfg.run_dir
    rules = saved_latency(cfg, space.rules_of(cfg.space, cfg.search.algorithm))
    if p.runs("search"):
        check_storage(run_dir, cfg.search.storage_path)
        if address is None:
            d = cfg.data
            streams = d.dataset == "shards" and d.stream == "stream" and d.decode == "ray_data"
            check_resources(cfg.search, data_cpus=d.data_cpus if streams else 0.0)
    # Data and the finished teacher are read from disk at most once per command.
    dataset = (lambda: data) if data is not None else functools.cache(partial(_load_data, cfg))
    loaded: dict = {}

    def teacher():
        if "net" not in loaded:
            loaded["net"] = load_teacher(cfg, run_dir / "teacher")
        return loaded["net"]

    if any(p.runs(s) for s in TRAINED):  # data, teacher files and budget: refused before
        dataset()  # the run folder is written
        spec = _teacher_spec_for_checks(cfg, p, dataset, teacher, teacher_model)
        if p.runs("search") or p.runs("finetune"):
            rules = with_latency(cfg, rules, spec, log)  # measures: may refuse the target
            space.check_budget(rules, spec)
            preflight(rules, spec)  # candidates prune, run and cost right, before training
    # Everything is checked: from here on the run folder is written.
    run_dir.mkdir(parents=True, exist_ok=True)
    set_aside_outputs(run_dir, p.discard, log)  # with the config.yaml they were made with
    save_config(cfg, run_dir / "config.yaml")
    save_latency(cfg, rules)

    total = len(stages)
    for i, stage in enumerate(stages, 1):
        action = p.actions.get(stage, "new")
        head = f"stage {i}/{total} {stage}"
        if stage == "report":
            log(f"{head}: report written: {report(run_dir)}")
            continue
        if action == "reuse" and _output_ok(stage, cfg, rules, teacher, trust_folder, log, dataset):
            log(f"{head}: reusing {run_dir} (same settings)")
            continue
        log(f"{head}: {'resuming' if action == 'resume' else 'running'}")
        mark_stage(run_dir, stage, p.fingerprints[stage], "running")
        made = _run_stage(
            stage, cfg, dataset, rules, p, teacher, address, dashboard, trust_folder, log,
            teacher_model,
        )  # fmt: skip
        if stage == "teacher":
            made.spec = with_ignore(made.spec, cfg.space.ignore)
            loaded["net"] = made
        mark_stage(run_dir, stage, p.fingerprints[stage], "done")
    return run_dir


def report(run_dir: Path) -> Path:
    """The report stage: rebuilt from the run folder's files alone (``casd-ray report``)."""
    if not Path(run_dir).is_dir():
        raise ArtifactError(f"{run_dir}: run folder not found")
    return build_report(run_dir)


def _load_data(cfg: ExperimentConfig):
    return load_data(cfg.data, cfg.seed)


def _teacher_spec_for_checks(cfg: ExperimentConfig, p: Plan, dataset, teacher, given=None):
    """The teacher's width spec, to check the budget before anything is written.

    A finished teacher is loaded whole (``teacher()``, kept for the later stages), so a
    corrupt ``model.pt`` is refused now rather than after the run folder was touched.
    """
    if p.actions.get("teacher") == "reuse":
        return teacher().spec
    if cfg.teacher.checkpoint and given is None:
        spec = load_checkpoint(cfg.teacher.checkpoint, cfg.model, dataset(), lambda _: None)[1]
    else:
        spec = teacher_spec(cfg.model, dataset())
    return with_ignore(spec, cfg.space.ignore)


def load_teacher(cfg: ExperimentConfig, folder: Path):
    """The finished teacher with ``space.ignore`` applied to its channel groups; a missing or
    corrupt file says how to start over."""
    try:
        net = load_network(folder)
    except ArtifactError as err:
        raise ArtifactError(f"{err}; rerun with --fresh teacher to train it again") from None
    net.spec = with_ignore(net.spec, cfg.space.ignore)
    return net


def _output_ok(
    stage: str, cfg: ExperimentConfig, rules, teacher, trust_folder: bool, log: Log, dataset
) -> bool:
    """Whether a finished stage's outputs can be reused as they are.

    Derived files are rebuilt here (a lost or torn trials table from the search's results);
    a corrupt fine-tune summary reruns the fine-tune, which reuses its finished parts.
    """
    run_dir = cfg.run_dir
    if stage == "teacher":
        teacher()  # checks every teacher file (and keeps the network for the next stages)
        data_file = run_dir / "teacher" / "data.json"
        try:
            read_json(data_file)
        except ArtifactError as err:  # derived from the data: rewritten, the teacher is kept
            log(f"teacher: {err}; rewriting it")
            write_json(data_file, dataset().describe())
    if stage == "search":
        try:
            read_trials(run_dir / TRIALS_FILE)
        except ArtifactError as err:
            log(f"search: {err}; rebuilding it from {run_dir / 'search'}")
            s = cfg.search
            rebuild_table(
                run_dir, rules, s.max_epochs, teacher().spec, trust_folder, s.storage_path
            )
    if stage == "finetune":
        try:
            read_summary(run_dir / SUMMARY)
            for part in PARTS:  # what the report may tell a user to deploy must load and run
                verify_export(run_dir / part)
        except ArtifactError as err:
            log(f"finetune: {err}")
            return False
    return True


def _run_stage(
    stage, cfg, dataset, rules, p, teacher, address, dashboard, trust_folder, log, given=None
):
    """Run one stage on its inputs; returns the teacher network for the teacher stage."""
    run_dir = cfg.run_dir
    amp = cfg.search.amp
    if stage == "teacher":
        return make_teacher(
            dataset(),
            cfg.model,
            cfg.teacher,
            cfg.seed,
            run_dir / "teacher",
            settings=p.fingerprints["teacher"],
            amp=amp,
            log=log,
            given=given,
        )
    if stage == "search":
        return run_search(
            dataset(),
            teacher(),
            search_cfg=cfg.search,
            plan=trial_plan(cfg.space, cfg.distill, cfg.search, cfg.seed, rules=rules),
            run_dir=run_dir,
            resume=p.actions["search"] == "resume",
            trust_folder=trust_folder,
            address=address,
            dashboard=dashboard,
            log=log,
        )
    # finetune and audit: students of the teacher, from the trials table
    run, extra = (
        (run_finetune, {}) if stage == "finetune" else (run_audit, {"top_k": cfg.audit.top_k})
    )
    return run(
        dataset(),
        teacher(),
        read_trials(run_dir / TRIALS_FILE),
        finetune_cfg=cfg.finetune,
        distill_cfg=cfg.distill,
        rules=rules,
        seed=cfg.seed,
        run_dir=run_dir,
        settings=p.fingerprints["finetune"],
        amp=amp,
        log=log,
        **extra,
    )
