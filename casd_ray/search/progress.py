"""One log line per finished trial: outcome, counts, best completed score, ETA."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from ray import tune

from casd_ray.artifacts.trials import BUDGET_SLACK
from casd_ray.config import SearchConfig
from casd_ray.search.results import error_reason, trial_error
from casd_ray.widths.space import SpaceRules

Log = Callable[[str], None]


class ProgressCallback(tune.Callback):
    """One log line per finished trial: outcome, counts, best completed score, ETA.

    Tune pickles callbacks into the experiment state; the log function is dropped on
    pickling (it may be a closure of the caller), and after a restore the module-level
    ``LOG`` (set by ``run_search``) is used instead.
    """

    def __init__(self, search_cfg: SearchConfig, rules: SpaceRules, log: Log) -> None:
        self.log: Log | None = log
        self.t0 = time.time()
        self.best: tuple[float, str] | None = None
        self.max_epochs, self.total = search_cfg.max_epochs, search_cfg.num_samples
        self.target, self.metric = rules.budget()[0], rules.metric
        self.screened, self.best_rung0 = 0, float("-inf")

    # Candidates stopped at rung 0 take seconds each and come by the hundred: one line per
    # SCREEN_EVERY of them, not one each.
    SCREEN_EVERY = 25

    def __getstate__(self) -> dict:
        return {**self.__dict__, "log": None}

    def _emit(self, msg: str) -> None:
        (self.log or LOG[0])(msg)

    def _counts(self, trials, current, outcome: str) -> str:
        # the callback fires before Tune marks ``current`` finished: count it as such
        status = [t.status for t in trials if t is not current]
        status.append(outcome)
        done = sum(s in ("TERMINATED", "ERROR") for s in status)
        eta = ""
        if done:
            left = max(0, self.total - done)
            eta = f", ETA {_fmt_s((time.time() - self.t0) / done * left)}"
        return (
            f"{done}/{self.total} done, {status.count('RUNNING')} running, "
            f"{status.count('ERROR')} errored{eta}"
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        res = trial.last_result or {}
        epochs = int(res.get("epoch", 0))
        if epochs == 0 and "rung0_score" in res:
            self.screened += 1
            self.best_rung0 = max(self.best_rung0, float(res["rung0_score"]))
            if self.screened % self.SCREEN_EVERY == 0:
                self._emit(
                    f"rung 0: {self.screened} candidates stopped after screening (best "
                    f"rung-0 score {self.best_rung0:.4f}) | "
                    f"{self._counts(trials, trial, 'TERMINATED')}"
                )
            return
        acc = float(res.get("best_val_acc", float("nan")))
        full = epochs >= self.max_epochs
        ok = float(res.get(f"{self.metric}_ratio", math.inf)) <= self.target + BUDGET_SLACK
        if full and ok and (self.best is None or acc > self.best[0]):
            self.best = (acc, trial.trial_id)
        what = "finished" if full else f"stopped early at epoch {epochs}/{self.max_epochs}"
        best = f"best completed {self.best[0]:.4f} ({self.best[1]})" if self.best else "-"
        self._emit(
            f"trial {trial.trial_id} {what}: val_acc {acc:.4f}, "
            f"flops_ratio {float(res.get('flops_ratio', float('nan'))):.3f} | "
            f"{self._counts(trials, trial, 'TERMINATED')} | {best}"
        )

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        reason = error_reason(trial_error(trial))
        self._emit(
            f"trial {trial.trial_id} failed: {reason} | {self._counts(trials, trial, 'ERROR')}"
        )


LOG: list[Log] = [print]


def _fmt_s(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
