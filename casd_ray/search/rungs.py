"""How long each candidate trains: rung 0 (screening), then Ray Tune's ASHA, with the rules a
width search needs.

0. **Rung 0: screen many, distil few** (``search.screen.promote``). Every candidate first
   reports a score with no training (epoch 0, :mod:`casd_ray.search.screening`). Exactly
   ``promote`` candidates go on to distillation, the controls among them: a candidate is
   promoted when its rung-0 score is within the top ``promote / num_samples`` of the scores
   seen so far (at least the best), and the last candidates are promoted regardless when
   the quota would otherwise go unfilled. The search's compute is then fixed in advance —
   ``num_samples`` rung-0 scores plus ``promote`` distillations — which is what makes an
   equal-compute comparison exact. The first ``search.screen.observe`` part of the
   candidates is only screened (the secretary rule's observation phase): a searcher that
   learns proposes its best candidates late, and on CIFAR-10 the places had gone to the
   first leaders (rung-0 ranks 15-25 of 48) before TPE proposed its best (``docs/results.md``).
   Decisions are made as scores arrive, not after all of rung 0, so that no trial waits,
   paused and holding a slot of the searcher's concurrency limit, for the others.
1. **The controls are never stopped** (``search.keep_control``). The free allocations
   (:mod:`casd_ray.widths.controls`) are the yardstick of every search: the report compares
   the winner with them, and a control stopped early says little. Their results still enter
   the rungs, so they set the bar for the other trials.
2. **Decisions that do not depend on timing** (``search.generation_size``). Plain ASHA compares
   a trial arriving at a rung with whichever trials happened to arrive there before it, so the
   same seed on a busy and an idle machine stops different trials (seen with ``make demo``:
   6 vs 7 completed trials, a different winner). With generations, trial ``i`` belongs to
   generation ``i // generation_size`` and is compared only with trials of *earlier*
   generations, which have all finished before it starts
   (:class:`casd_ray.search.searchers.GenerationLimiter` holds the next generation back until then).
   The decision then depends on the seed alone.

Both are thin layers on Ray's own ``ASHAScheduler`` and its bracket bookkeeping (rungs,
cutoff = the ``1 - 1/reduction_factor`` quantile): with ``generation_size=1`` and one trial at
a time the decisions equal ASHA's (``tests/test_rungs.py`` compares them).
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket

from casd_ray.config import SearchConfig


class _GenerationBracket(_Bracket):
    """Ray's ASHA bracket whose cutoff for a trial sees only earlier generations' results."""

    def __init__(self, bracket: _Bracket, generation: dict[str, int]) -> None:
        self.__dict__.update(bracket.__dict__)  # Ray's rungs, reduction factor, stop rule
        self.generation = generation
        self._asking = math.inf

    def on_result(self, trial: Any, cur_iter: int, cur_rew: float | None) -> str:
        self._asking = self.generation[trial.trial_id]
        try:
            return super().on_result(trial, cur_iter, cur_rew)
        finally:
            self._asking = math.inf

    def cutoff(self, recorded: dict[str, float]) -> float | None:
        earlier = {t: v for t, v in recorded.items() if self.generation[t] < self._asking}
        return super().cutoff(earlier)


class SearchASHA(ASHAScheduler):
    """Rung 0 (rule 0), then ASHA that keeps the controls (rule 1) and may decide by
    generations (rule 2).

    ``controls``: the controls' genomes (empty: every trial may be stopped);
    ``generation_size``: trials per generation (``None``: Ray's asynchronous ASHA);
    ``promote``: candidates that pass rung 0 out of ``num_samples`` (``None``: no rung 0);
    ``observe``: the part of the ``num_samples`` (in proposal order) only screened.
    """

    def __init__(
        self,
        controls: list[dict[str, float]] | None = None,
        generation_size: int | None = None,
        *,
        promote: int | None = None,
        num_samples: int = 0,
        observe: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.controls = [dict(c) for c in controls or []]
        self.generation_size = generation_size
        self.generation: dict[str, int] = {}  # trial id -> generation, in the order added
        self.order: dict[str, int] = {}  # trial id -> index in proposal order
        self.promote, self.num_samples, self.observe = promote, num_samples, observe
        self.rung0: dict[str, float] = {}  # trial id -> rung-0 score
        self.promoted: list[str] = []
        self.controls_screened = 0
        if generation_size:
            self._brackets = [_GenerationBracket(b, self.generation) for b in self._brackets]

    def _is_control(self, config: dict) -> bool:
        return any(
            all(abs(float(config.get(k, math.nan)) - v) < 1e-9 for k, v in c.items())
            for c in self.controls
        )

    def _screen(self, trial: Any, score: float) -> str:
        """Rule 0: promote, or stop at rung 0 (see the module docstring)."""
        tid = trial.trial_id
        if tid in self.rung0:  # a trial restarted from scratch reports rung 0 again
            return self.CONTINUE if tid in self.promoted else self.STOP
        mine = self.generation.get(tid, 0)
        pool = [
            v for t, v in self.rung0.items()
            if not self.generation_size or self.generation.get(t, 0) < mine
        ]  # fmt: skip
        self.rung0[tid] = score
        control = self._is_control(trial.config)
        self.controls_screened += control
        # places held for the controls still to report: with concurrent trials a control
        # may arrive after the others filled the quota, and is promoted all the same
        held = max(0, len(self.controls) - self.controls_screened)
        need = self.promote - len(self.promoted) - held
        position = self.order.get(tid, len(self.order))
        left = self.num_samples - 1 - position  # after this one
        quota = max(1, math.ceil(self.promote * (len(pool) + 1) / max(self.num_samples, 1)))
        rank = 1 + sum(v >= score for v in pool)  # a tie does not earn a place
        leads = rank <= quota and position >= self.observe * self.num_samples
        keep = control or (need > 0 and (leads or left - held < need))
        if keep:
            self.promoted.append(tid)
            return self.CONTINUE
        return self.STOP

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        # Tune adds trials in the order the searcher proposed them (the limiter's order)
        if trial.trial_id not in self.generation:
            self.order[trial.trial_id] = len(self.order)
            self.generation[trial.trial_id] = len(self.generation) // (self.generation_size or 1)
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get(self._time_attr, 1) == 0:  # rung 0
            if self.promote is None:
                return self.CONTINUE
            return self._screen(trial, float(result[self._metric]))
        decision = super().on_trial_result(tune_controller, trial, result)
        unfinished = result.get(self._time_attr, 0) < self._max_t
        if decision == self.STOP and unfinished and self._is_control(trial.config):
            self._num_stopped -= 1
            return self.CONTINUE
        return decision


METRIC = "objective"  # fidelity reached + score there (casd_ray.search.trial_plan.objective)


def make_scheduler(s: SearchConfig, controls: list[dict[str, float]]) -> TrialScheduler:
    """The search section's scheduler: rung 0 when ``search.screen.promote`` is set, then FIFO
    (every promoted trial runs ``max_epochs``) or ASHA with the rules above."""
    promote = s.screen.promote
    if s.scheduler == "fifo" and promote is None:
        return FIFOScheduler()
    grace = s.max_epochs if s.scheduler == "fifo" else min(s.grace_period, s.max_epochs)
    return SearchASHA(
        controls if s.keep_control else None,
        s.generation_size,
        promote=None if promote is None else min(promote, s.num_samples),
        num_samples=s.num_samples,
        observe=s.screen.observe,
        metric=METRIC,
        mode="max",
        time_attr="epoch",
        max_t=s.max_epochs,
        grace_period=grace,
        reduction_factor=s.reduction_factor,
    )
