"""MixLLM's latency penalty under the built-in load spike (12 simulated hours, ~10 s).

The claim: against beta = 0, the penalty cuts p95 wait and abandonment, and without the
admission check also rejections, at no more than 1 point of quality %. Checked per seed on 3
seeds with common random numbers (the same arrivals and users for every variant). Over the
spike the effect is about 2x on p95 wait (11 s vs 19-25 s) and abandonment (~300 vs ~580 of
~13,000 requests); seed-to-seed spread of those is ~10%, so each per-seed comparison is
many spreads apart.
"""

from __future__ import annotations

from sim.runner import run
from sim.scenario import PolicySpec, load_scenario


def test_latency_penalty_cuts_waits_abandonment_and_rejections_in_the_spike():
    variants = {
        "penalty": {},
        "beta0": {"penalty": False},
        "penalty_no_admission": {"admission": False},
        "beta0_no_admission": {"admission": False, "penalty": False},
    }
    specs = [PolicySpec(name="mixllm", params=p, label=k) for k, p in variants.items()]
    res = run(load_scenario("load_spike"), specs, seeds=3, keep_requests=False)
    by = {}
    for s in res.summaries:
        by.setdefault(s["policy"], []).append(s)
    for on, off in zip(by["penalty"], by["beta0"], strict=True):
        assert on["p95_wait_s"] < 0.8 * off["p95_wait_s"]
        assert on["abandoned"] < 0.8 * off["abandoned"]
        assert on["rejected"] == 0  # the admission check: nothing is sent to a full queue
        assert on["quality_pct_of_reference"] >= off["quality_pct_of_reference"] - 1.0
    for on, off in zip(by["penalty_no_admission"], by["beta0_no_admission"], strict=True):
        assert off["rejected"] > 50  # routing by score alone fills gpt-4's queue of 64
        assert on["rejected"] < 0.2 * off["rejected"]
        assert on["p95_wait_s"] < 0.8 * off["p95_wait_s"]
        assert on["quality_pct_of_reference"] >= off["quality_pct_of_reference"] - 1.0
