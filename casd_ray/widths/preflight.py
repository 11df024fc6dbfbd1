"""The pre-flight check: a user's model is refused before its teacher trains, not after.

A model that Torch-Pruning traces can still be one casd-ray cannot cut (a channel split it
mis-traces, a grouped conv in a shape it does not expect) or cost (a layer whose channels
follow the group unevenly). Found in a trial, that costs a trained teacher and a search of
crashes; found here it costs a few forwards of an untrained copy. The check builds the
uniform candidate on the budget and a few random ones exactly as trials do, inherits their
weights, runs a forward, rebuilds each from its widths alone (as ``load_compressed`` does) and
compares the cost model with ``FlopCounterMode`` and ``numel``. Any failure is one line that
names the layer and says what to do.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from casd_ray.errors import SourceError
from casd_ray.models.cost import measure_flops
from casd_ray.models.family import Spec, build_model, family_of, flops, params
from casd_ray.widths.inherit import inherit
from casd_ray.widths.space import SpaceRules, candidate_spec, control_genome, gene_names

FIX = "list that layer in space.ignore, or report the model (casd-ray cannot cut it exactly)"


def preflight(rules: SpaceRules, spec: Spec, *, samples: int = 2, seed: int = 0) -> None:
    """Raise :class:`SourceError` (one line) unless the uniform candidate on the budget and
    ``samples`` random ones prune, run, rebuild from their widths and cost what the cost
    model says. Families whose pruning is hand-written (``traced = False``) pass at once."""
    if not family_of(spec).traced:
        return
    rng = np.random.default_rng(seed)
    genes = gene_names(spec, rules.granularity)
    genomes = [("the uniform candidate", control_genome(rules, spec))]
    genomes += [
        (
            f"random candidate {i + 1}",
            {g: float(rng.uniform(rules.min_ratio, rules.max_ratio)) for g in genes},
        )
        for i in range(samples)
    ]
    teacher = build_model(spec).eval()
    for label, genome in genomes:
        student = candidate_spec(rules, spec, genome)
        problem = check_candidate(teacher, spec, student)
        if problem:
            arch = getattr(spec, "arch", "model")
            raise SourceError(
                f"model.arch: {arch} cannot be compressed exactly: {problem} ({label} at "
                f"{rules.target:g} {rules.metric}); {FIX}"
            )


def check_candidate(teacher: nn.Module, spec: Spec, student: Spec) -> str | None:
    """What is wrong with ``student`` cut from ``teacher`` (None: nothing)."""
    shape = (getattr(spec, "in_channels", 3), *spec.image_size)
    try:
        model = inherit(teacher, spec, student).eval()
    except Exception as err:  # noqa: BLE001 - Torch-Pruning can raise anything
        return f"pruning fails ({_line(err)})"
    layer = _failing_layer(model, shape)
    if layer:
        return layer
    rebuilt = build_model(student)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if want != got:
        name = next(
            (k for k in want if want[k] != got.get(k)), next(iter(got.keys() - want.keys()), "?")
        )
        return f"{name} rebuilt from widths.json has another shape"
    measured = measure_flops(model, shape)
    if measured != flops(student):
        wrong = _miscounted_layer(model, student)
        what = f"{wrong} is costed wrong" if wrong else "operations besides conv/linear layers"
        if not wrong:  # e.g. attention's matrix products, which scale with the widths
            what += " (matrix products?) change with the widths"
        return f"{what} ({flops(student)} FLOPs counted, {measured} run)"
    counted = sum(p.numel() for p in model.parameters())
    if counted != params(student):
        wrong = _miscounted_layer(model, student) or "a parameter"
        return f"{wrong} is costed wrong ({params(student)} parameters counted, {counted} built)"
    return None


def _failing_layer(model: nn.Module, shape: tuple[int, ...]) -> str | None:
    """None if a forward runs, else which layer raised (the last one entered)."""
    entered: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, _i, n=n: entered.append(n))
        for n, m in model.named_modules()
        if n and not any(True for _ in m.children())
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(2, *shape))
    except Exception as err:  # noqa: BLE001 - a wrongly pruned layer raises anything
        where = entered[-1] if entered else "the network"
        return f"{where} fails after pruning ({_line(err)})"
    finally:
        for h in hooks:
            h.remove()
    return None


def _miscounted_layer(model: nn.Module, student: Spec) -> str | None:
    """The first conv/linear layer whose channels differ from the cost model's count."""
    for name, (out, inp) in family_of(student).layer_channels(student).items():
        m = model.get_submodule(name)
        if isinstance(m, nn.Conv2d) and (m.out_channels, m.in_channels) != (out, inp):
            return f"{name} ({m.out_channels}x{m.in_channels} channels, counted {out}x{inp})"
        if isinstance(m, nn.Linear) and (m.out_features, m.in_features) != (out, inp):
            return f"{name} ({m.out_features}x{m.in_features} features, counted {out}x{inp})"
    return None


def _line(err: Exception) -> str:
    text = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"
