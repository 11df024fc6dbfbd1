"""How long each candidate trains: Ray Tune's ASHA with two rules a width search needs.

1. **The control is never stopped** (``search.keep_control``). The uniform-width trial is the
   yardstick of every search: the report compares the winner with it and ranks it among the
   trials, and a control stopped at the first rung says little. Its results still enter the
   rungs, so it sets the bar for the other trials as before.
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
    """ASHA that may keep the control (rule 1) and decide by generations (rule 2).

    ``control``: the control's genome (``None``: it may be stopped like any trial);
    ``generation_size``: trials per generation (``None``: Ray's asynchronous ASHA).
    """

    def __init__(
        self,
        control: dict[str, float] | None = None,
        generation_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.control = dict(control) if control else None
        self.generation_size = generation_size
        self.generation: dict[str, int] = {}  # trial id -> generation, in the order added
        if generation_size:
            self._brackets = [_GenerationBracket(b, self.generation) for b in self._brackets]

    def _is_control(self, config: dict) -> bool:
        return self.control is not None and all(
            abs(float(config.get(k, math.nan)) - v) < 1e-9 for k, v in self.control.items()
        )

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        # Tune adds trials in the order the searcher proposed them (the limiter's order)
        if trial.trial_id not in self.generation:
            self.generation[trial.trial_id] = len(self.generation) // (self.generation_size or 1)
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        unfinished = result.get(self._time_attr, 0) < self._max_t
        if decision == self.STOP and unfinished and self._is_control(trial.config):
            self._num_stopped -= 1
            return self.CONTINUE
        return decision


def make_scheduler(s: SearchConfig, control: dict[str, float]) -> TrialScheduler:
    """The search section's scheduler: FIFO, or ASHA with the rules above."""
    if s.scheduler == "fifo":
        return FIFOScheduler()
    return SearchASHA(
        control if s.keep_control else None,
        s.generation_size,
        metric="val_acc",
        mode="max",
        time_attr="epoch",
        max_t=s.max_epochs,
        grace_period=min(s.grace_period, s.max_epochs),
        reduction_factor=s.reduction_factor,
    )
