"""RouteLLM-style threshold router: pair choice, calibration to a strong share, fallbacks."""

from __future__ import annotations

import numpy as np
import pytest
from routing_workloads import MODELS, context, learnable_workload, llm_infos, reference

from policies import registry
from policies.threshold import SHARE_GRID
from reports.frontier import SingleLLM
from sim.errors import PolicyError
from sim.offline import evaluate_offline, idle_view
from sim.types import SPLIT_TEST, LLMInfo, Query


@pytest.fixture(scope="module")
def wl():
    return learnable_workload()


@pytest.fixture(scope="module")
def router(wl):
    pol = registry.create("threshold")
    pol.setup(context(wl, llm_infos()))
    return pol


def test_default_pair_is_reference_and_best_cheap_llm(router):
    # `large` is the reference; `small` and `mid` are both >= 5x cheaper, and `mid` is
    # right more often on average (0.60 vs 0.525).
    assert (router.strong, router.weak) == ("large", "mid")
    assert router.tradeoff_value in SHARE_GRID


@pytest.mark.parametrize("share", [0.1, 0.3, 0.5, 0.8])
def test_calibrates_to_target_share(router, wl, share):
    valid_p = router.p_strong[router.split.valid_rows]
    n_v = len(valid_p)
    router.set_tradeoff(share)
    on_valid = float(np.mean(valid_p >= router.threshold))
    # The threshold is the round(s * n)-th highest validation score: exact up to rounding
    # (scores are continuous, so ties have probability 0).
    assert abs(on_valid - share) <= 1.0 / n_v + 1e-12
    llms = llm_infos()
    rows = wl.rows(SPLIT_TEST)
    res = evaluate_offline(router, wl, llms, rows, reference=reference(llms))
    # On test rows the strong share is a binomial proportion around the validation share;
    # its variance plus the quantile estimate's is about s(1-s)(1/n_v + 1/n_t): allow 4 sd
    # (a false failure has probability about 6e-5 per share).
    sd = np.sqrt(share * (1 - share) * (1 / n_v + 1 / len(rows)))
    assert abs(res.route_share["large"] - share) <= 4 * sd + 1 / n_v
    assert res.route_share["small"] == 0.0


def test_more_strong_share_costs_more_and_beats_the_pair_mix(router, wl):
    llms = llm_infos()
    rows = wl.rows(SPLIT_TEST)
    ref = reference(llms)
    res = []
    for s in SHARE_GRID:
        router.set_tradeoff(s)
        res.append(evaluate_offline(router, wl, llms, rows, reference=ref))
    costs = np.array([r.cost_pct for r in res])
    assert np.all(np.diff(costs) >= -1e-9)  # a lower threshold only adds strong calls
    # Learned, not random: at half strong calls it beats a coin flip between the pair.
    mid = evaluate_offline(SingleLLM("mid"), wl, llms, rows, reference=ref)
    coin = 0.5 * (mid.quality_pct + 100.0)
    half = res[SHARE_GRID.index(0.5)]
    # Expected about 98% vs 82%; sd of a test quality % about 2.6 points (see predictive).
    assert half.quality_pct > coin + 8.0


def test_falls_back_to_the_other_llm_when_one_cannot_accept(router, wl):
    llms = llm_infos()
    router.set_tradeoff(1.0)
    view = idle_view(llms)
    q = Query(id=0, row=int(wl.rows(SPLIT_TEST)[0]), arrival_s=0.0, input_tokens=100, task=0)
    assert router.route(q, view).llm == "large"
    view.up[2] = False
    view.refresh(2)
    assert router.route(q, view).llm == "mid"
    view.up[1] = False
    view.refresh(1)
    assert router.route(q, view).llm == "small"  # neither of the pair: cheapest available


def test_explicit_pair_and_bad_names(wl):
    pol = registry.create("threshold", {"strong": "mid", "weak": "small", "strong_share": 0.4})
    pol.setup(context(wl, llm_infos()))
    assert (pol.strong, pol.weak, pol.tradeoff_value) == ("mid", "small", 0.4)
    bad = registry.create("threshold", {"strong": "gpt-5"})
    with pytest.raises(PolicyError, match="gpt-5"):
        bad.setup(context(wl, llm_infos()))


def test_a_removed_member_of_a_learned_pair_is_replaced(wl):
    pol = registry.create("threshold", {"strong_share": 0.3})
    pol.setup(context(wl, llm_infos()))
    assert pol.weak == "mid"
    pol.on_llm_removed("mid")
    assert (pol.strong, pol.weak) == ("large", "small")
    # Recalibrated for the new pair: still 30% strong calls on validation rows.
    valid_p = pol.p_strong[pol.split.valid_rows]
    assert abs(np.mean(valid_p >= pol.threshold) - 0.3) <= 1.0 / len(valid_p) + 1e-12
    fixed = registry.create("threshold", {"strong": "large", "weak": "mid"})
    fixed.setup(context(wl, llm_infos()))
    fixed.on_llm_removed("mid")
    assert (fixed.strong, fixed.weak) == ("large", "mid")


def test_a_price_change_re_chooses_a_learned_weak_member(wl):
    pol = registry.create("threshold", {"strong_share": 0.3})
    pol.setup(context(wl, llm_infos()))
    assert pol.weak == "mid"
    # `mid` at the strong LLM's prices is no longer weak_cost_ratio times cheaper.
    pol.on_price_changed(LLMInfo("mid", "mid", MODELS.index("mid"), 10.0, 30.0))
    assert pol.llms["mid"].price_out_per_mtok == 30.0
    assert (pol.strong, pol.weak) == ("large", "small")
    valid_p = pol.p_strong[pol.split.valid_rows]
    assert abs(np.mean(valid_p >= pol.threshold) - 0.3) <= 1.0 / len(valid_p) + 1e-12
