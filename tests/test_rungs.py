"""ASHA's casd-ray rules (``search.rungs``), driven by hand the way Tune drives a scheduler.

The reference is Ray's own ``ASHAScheduler``: with generations of one trial each, fed one trial
at a time, every decision must equal its decision; with larger generations, a decision must not
depend on the order in which the trials of one generation report.
"""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from casd_ray.config import SearchConfig
from casd_ray.search.rungs import SearchASHA, make_scheduler

ASHA = dict(metric="val_acc", mode="max", time_attr="epoch", max_t=9, grace_period=1)
CONTROL = {"stage0": 0.5, "stage1": 0.5}


def trial(i: int, config: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(trial_id=f"t{i:03d}", config=config or {"stage0": 0.01 * i})


def curve(i: int, epoch: int) -> float:
    """A score per (trial, epoch): seeded noise around a trial-specific level."""
    rng = random.Random(i * 1000 + epoch)
    return 0.3 + 0.05 * (i % 7) + 0.02 * epoch + rng.uniform(-0.04, 0.04)


def run_sequential(sched, n: int) -> list[tuple[str, int, str]]:
    """Trials one after another; every (trial, epoch, decision) until each stops."""
    log = []
    for i in range(n):
        t = trial(i)
        sched.on_trial_add(None, t)
        for epoch in range(1, ASHA["max_t"] + 1):
            decision = sched.on_trial_result(None, t, {"epoch": epoch, "val_acc": curve(i, epoch)})
            log.append((t.trial_id, epoch, decision))
            if decision == sched.STOP:
                break
        sched.on_trial_complete(None, t, {"epoch": epoch, "val_acc": curve(i, epoch)})
    return log


@pytest.mark.parametrize("rf", [2, 3])
def test_generations_of_one_decide_like_rays_asha(rf):
    ours = run_sequential(SearchASHA(None, 1, reduction_factor=rf, **ASHA), 30)
    rays = run_sequential(ASHAScheduler(reduction_factor=rf, **ASHA), 30)
    assert ours == rays
    assert any(d == "STOP" for *_, d in rays) and any(e == 9 for _, e, _ in rays)


def run_generation(sched, trials: list, order: list[int]) -> dict[str, int]:
    """One generation epoch by epoch, its trials reporting in ``order``; epochs run per trial."""
    epochs = {}
    live = list(trials)
    for epoch in range(1, ASHA["max_t"] + 1):
        for k in order:
            t = trials[k]
            if t not in live:
                continue
            i = int(t.trial_id[1:])
            result = {"epoch": epoch, "val_acc": curve(i, epoch)}
            if sched.on_trial_result(None, t, result) == sched.STOP:
                live.remove(t)
                epochs[t.trial_id] = epoch
    return epochs


def test_decisions_do_not_depend_on_the_order_within_a_generation():
    outcomes, asha_outcomes = set(), set()
    for seed in range(6):
        order = random.Random(seed).sample(range(4), 4)
        for cls, out in ((SearchASHA, outcomes), (None, asha_outcomes)):
            if cls is None:
                sched = ASHAScheduler(reduction_factor=2, **ASHA)
            else:
                sched = SearchASHA(None, 4, reduction_factor=2, **ASHA)
            gens = [[trial(4 * g + k) for k in range(4)] for g in range(3)]
            for t in itertools.chain(*gens):
                sched.on_trial_add(None, t)
            epochs = {}
            for gen in gens:
                epochs |= run_generation(sched, gen, order)
            out.add(tuple(sorted(epochs.items())))
    assert len(outcomes) == 1  # one result whatever the order
    assert len(asha_outcomes) > 1  # plain ASHA: the order changes who is stopped
    (stops,) = outcomes
    assert any(e < 9 for _, e in stops)  # later generations are still cut


def test_first_generation_is_never_stopped():
    sched = SearchASHA(None, 4, reduction_factor=2, **ASHA)
    gen = [trial(i) for i in range(4)]
    for t in gen:
        sched.on_trial_add(None, t)
    assert set(run_generation(sched, gen, [3, 2, 1, 0]).values()) == {9}


def test_control_is_never_stopped_but_counts():
    sched = SearchASHA([CONTROL], None, reduction_factor=2, **{**ASHA, "max_t": 4})
    good = [trial(i) for i in range(4)]
    ctrl = trial(99, dict(CONTROL))
    for t in [*good, ctrl]:
        sched.on_trial_add(None, t)
    for i, t in enumerate(good):  # good scores first, so later bad ones fall below the cut
        sched.on_trial_result(None, t, {"epoch": 1, "val_acc": 0.9 - 0.01 * i})
    weak = trial(50, {"stage0": 0.9, "stage1": 0.9})
    sched.on_trial_add(None, weak)
    assert sched.on_trial_result(None, weak, {"epoch": 1, "val_acc": 0.1}) == sched.STOP
    assert sched.on_trial_result(None, ctrl, {"epoch": 1, "val_acc": 0.05}) == sched.CONTINUE
    assert sched.on_trial_result(None, ctrl, {"epoch": 4, "val_acc": 0.05}) == sched.STOP  # done
    plain = SearchASHA(None, None, reduction_factor=2, **{**ASHA, "max_t": 4})
    for t in [*good, ctrl]:
        plain.on_trial_add(None, t)
    for i, t in enumerate(good):
        plain.on_trial_result(None, t, {"epoch": 1, "val_acc": 0.9 - 0.01 * i})
    assert plain.on_trial_result(None, ctrl, {"epoch": 1, "val_acc": 0.05}) == plain.STOP


def test_make_scheduler_follows_the_search_section():
    assert isinstance(make_scheduler(SearchConfig(scheduler="fifo"), [CONTROL]), FIFOScheduler)
    s = make_scheduler(SearchConfig(generation_size=4, max_epochs=3, grace_period=5), [CONTROL])
    assert isinstance(s, SearchASHA) and s.generation_size == 4 and s.controls == [CONTROL]
    assert s._max_t == 3  # grace period clipped to max_epochs inside
    assert make_scheduler(SearchConfig(keep_control=False), [CONTROL]).controls == []
    screened = make_scheduler(
        SearchConfig(scheduler="fifo", num_samples=40, screen={"promote": 5}), [CONTROL]
    )
    assert isinstance(screened, SearchASHA) and (screened.promote, screened.num_samples) == (5, 40)


def screen_all(sched, scores: list[float], controls: dict[int, dict] | None = None) -> list[int]:
    """Rung-0 reports in proposal order; the indices promoted."""
    trials = [trial(i, (controls or {}).get(i)) for i in range(len(scores))]
    for t in trials:
        sched.on_trial_add(None, t)
    out = []
    for i, (t, score) in enumerate(zip(trials, scores, strict=True)):
        if sched.on_trial_result(None, t, {"epoch": 0, "objective": score}) == sched.CONTINUE:
            out.append(i)
    return out


RUNG0 = dict(metric="objective", mode="max", time_attr="epoch", max_t=3, grace_period=3)


def test_rung0_promotes_exactly_the_quota_controls_included():
    rng = random.Random(0)
    for n, k in ((60, 6), (100, 8), (30, 29), (10, 1)):
        scores = [rng.random() for _ in range(n)]
        sched = SearchASHA([CONTROL], promote=k, num_samples=n, **RUNG0)
        promoted = screen_all(sched, scores, {0: dict(CONTROL)})
        assert len(promoted) == k and promoted[0] == 0, (n, k)  # the control goes first


def test_rung0_quota_holds_when_reports_arrive_out_of_order():
    """Concurrent trials report rung 0 in any order: a control arriving after the quota of
    others was filled must not make ``promote + 1`` distilled trials (the random arm of
    ``compare`` then spent more than the search it is compared with)."""
    rng = random.Random(1)
    n, k = 6, 3
    for _ in range(50):
        scores = [rng.random() for _ in range(n)]
        trials = [trial(i, dict(CONTROL) if i == 0 else None) for i in range(n)]
        sched = SearchASHA([CONTROL], promote=k, num_samples=n, **RUNG0)
        for t in trials:
            sched.on_trial_add(None, t)
        order = list(range(n))
        rng.shuffle(order)
        kept = [
            i for i in order
            if sched.on_trial_result(None, trials[i], {"epoch": 0, "objective": scores[i]})
            == sched.CONTINUE
        ]  # fmt: skip
        assert len(kept) == k and 0 in kept, (order, kept)


def test_rung0_promotes_high_scores_and_stops_low_ones():
    n, k = 100, 8
    scores = [0.5] * n
    scores[40], scores[70] = 0.99, 0.98  # clearly the best two, arriving mid-search
    sched = SearchASHA([], promote=k, num_samples=n, **RUNG0)
    promoted = screen_all(sched, scores)
    assert {40, 70} <= set(promoted)
    assert sched.on_trial_result(None, trial(40), {"epoch": 0, "objective": 0.99}) == "CONTINUE"
    # a promoted trial then runs to the end (FIFO after rung 0: grace period = max_t)
    assert sched.on_trial_result(None, trial(40), {"epoch": 1, "objective": 1.5}) == "CONTINUE"


def test_rung0_keeps_its_places_for_a_searcher_that_learns():
    """#29, seen in the CIFAR-10 compare: TPE's proposals improve once its random start-up is
    over, so the best rung-0 scores come late; promoting whatever led the scores seen so far
    spent the three places beside the controls on candidates 7, 14 and 16 of 48 (rung-0
    ranks 25, 24, 15), and the six best, proposed later, were never distilled. Candidates of
    the first ``observe`` part of the search are only screened (the secretary rule)."""
    n, k = 48, 6
    controls = {j: {"stage0": 0.1 * (j + 1), "stage1": 0.5} for j in range(3)}
    ranks = {0.0: [], 0.37: []}
    for seed in range(8):
        rng = random.Random(seed)  # 16 start-up proposals, then a better, learned level
        scores = [(0.40 if i < 16 else 0.46) + rng.uniform(-0.04, 0.04) for i in range(n)]
        rank = {i: r + 1 for r, i in enumerate(sorted(range(3, n), key=lambda i: -scores[i]))}
        for observe, found in ranks.items():
            sched = SearchASHA(list(controls.values()), promote=k, num_samples=n,
                               observe=observe, **RUNG0)  # fmt: skip
            promoted = screen_all(sched, scores, {j: dict(c) for j, c in controls.items()})
            assert len(promoted) == k and set(controls) <= set(promoted)
            searched = [i for i in promoted if i not in controls]
            assert observe == 0 or min(searched) >= observe * n  # only screened while observing
            found += [rank[i] for i in searched]
    mean = {observe: sum(r) / len(r) for observe, r in ranks.items()}
    assert mean[0.37] < 0.6 * mean[0.0], mean  # measured: 10.1 vs 22.2 of 45


def test_without_rung0_a_zero_epoch_report_continues():
    sched = SearchASHA([], **RUNG0)
    t = trial(0)
    sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, t, {"epoch": 0, "objective": 0.0}) == sched.CONTINUE
