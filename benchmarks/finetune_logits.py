"""The fine-tune's teacher logits computed once per recipe vs the teacher run per batch.

Every network a run fine-tunes (winner, uniform, audited trials, compare's arms) trains on the
same seeded batches, so ``casd_ray.pipeline.stages.student`` computes the teacher's
logits for them once and reuses them. Here two students of the config's budget (the uniform
network and one random genome repaired onto the budget) are fine-tuned one after the other,
as a run does, once with the shared logits and once with the teacher run on every batch.
Printed: images through the teacher, wall time of the two fine-tunes and its ratio, and the
largest difference in test accuracy (the same logits, so the same networks).

    python benchmarks/finetune_logits.py [CONFIG] [--smoke-test] [--set key=value ...]

The default config is ``experiments/quick.yaml`` (as ``make demo``) with a 1-epoch teacher
(its quality does not change the speed).
"""

from __future__ import annotations

import random
import time

from common import SMOKE, config_parser, prepare

from casd_ray.pipeline.plan import fingerprints
from casd_ray.pipeline.stages.student import StudentRecipe, part_settings, train_export
from casd_ray.train import devices, kd
from casd_ray.widths import space


def main() -> None:
    parser = config_parser(__doc__)
    args = parser.parse_args()
    overrides = ["teacher.epochs=1", *args.overrides, *(SMOKE if args.smoke_test else [])]
    cfg, data, teacher, out = prepare(args.config, overrides, "casd-ft-logits-")
    rules = space.rules_of(cfg.space, cfg.search.algorithm)
    rng = random.Random(cfg.seed)
    genes = space.gene_names(teacher.spec, rules.granularity)
    genomes = {
        "uniform": space.control_genome(rules, teacher.spec),
        "random": {g: rng.uniform(0.2, 1.0) for g in genes},
    }
    specs = {k: space.candidate_spec(rules, teacher.spec, g) for k, g in genomes.items()}
    seen = [0]
    teacher.model.register_forward_hook(lambda m, inp, o: seen.__setitem__(0, seen[0] + len(o)))
    stage = fingerprints(cfg)["finetune"]
    result = {}
    for mode, max_bytes in (("per batch", 0), ("shared", kd.LOGITS_MAX_BYTES)):
        kd.LOGITS_MAX_BYTES = max_bytes
        kd._CACHE.clear()
        seen[0], t0, acc = 0, time.perf_counter(), {}
        for name, spec in specs.items():
            metrics = train_export(
                data, teacher, spec, out / mode.replace(" ", "-") / name,
                recipe=StudentRecipe(cfg.finetune, cfg.distill, rules.importance, cfg.seed, False),
                settings=part_settings(stage, spec), device=devices.pick_device(0),
                log=print, label=f"{mode} {name}",
            )  # fmt: skip
            acc[name] = metrics["test_acc"]
        result[mode] = (seen[0], time.perf_counter() - t0, acc)
    (own_n, own_s, own_acc), (sh_n, sh_s, sh_acc) = result["per batch"], result["shared"]
    diff = max(abs(own_acc[k] - sh_acc[k]) for k in specs)
    print(f"students: {', '.join(f'{k} {s.model_dump_json()}' for k, s in specs.items())}")
    print(
        f"images through the teacher: per batch {own_n:,}, shared {sh_n:,} "
        f"= {sh_n / max(own_n, 1):.2f}x"
    )
    print(
        f"two fine-tunes, wall: per batch {own_s:.1f}s, shared {sh_s:.1f}s (incl. computing "
        f"the logits) -> {own_s / sh_s:.2f}x"
    )
    print(f"largest |test_acc difference|: {diff:.4f}")


if __name__ == "__main__":
    main()
