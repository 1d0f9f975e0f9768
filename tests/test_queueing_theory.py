"""The cluster as a queue matches queueing theory: M/M/c (Erlang C) and M/D/1 (P-K).

Tolerance: R independent replications (separate seeds) each give a mean wait W_r; their
sample mean has standard error s/sqrt(R) (replication means are independent, so the usual
autocorrelation of waits within one run does not bias the error). The theoretical mean must
lie within 4.5 standard errors (t with R-1 = 11 dof: two-sided p ~ 0.001). No allowance is
added for the bias of starting empty: the warm-up removes it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from helpers import llm, scenario
from policies.baselines import RandomPolicy
from sim.engine import Simulation, prepare_inputs
from sim.runner import build_workload

R = 12


def erlang_c_wait(lam: float, mu: float, c: int) -> float:
    """Mean queueing delay of M/M/c (Erlang C formula)."""
    a = lam / mu
    rho = a / c
    s = sum(a**k / math.factorial(k) for k in range(c))
    top = a**c / math.factorial(c) / (1 - rho)
    p_wait = top / (s + top)
    return p_wait / (c * mu - lam)


def pk_wait_deterministic(lam: float, d: float) -> float:
    """Mean queueing delay of M/D/1 (Pollaczek-Khinchine with E[S^2] = d^2)."""
    rho = lam * d
    return lam * d * d / (2 * (1 - rho))


def replicate_mean_waits(sc, reps: int) -> np.ndarray:
    out = []
    for r in range(reps):
        seed = 1000 + r
        wl = build_workload(sc, seed)
        inputs = prepare_inputs(sc, wl, seed)
        res = Simulation(sc, RandomPolicy(), inputs, seed=seed).run()
        req = res.requests
        m = req.filter((req["arrival_s"] >= sc.warmup_s) & (req["outcome"] == "completed"))
        assert m.height == req.filter(req["arrival_s"] >= sc.warmup_s).height
        out.append(float(m["wait_s"].mean()))
    return np.array(out)


def _single_queue(service: dict, rate: float, replicas: int, slots: int, duration: float):
    return scenario(
        duration_s=duration,
        warmup_s=duration * 0.1,
        arrivals={"kind": "poisson", "rate_per_s": rate},
        llms=[llm("gpt-4", replicas=replicas, slots=slots, max_queue=10**6, service=service)],
        feedback={"probability": 0.0},
        run={"drain_s": None, "sample_every_s": 100.0},
        workload={"source": "synthetic", "reference_llm": "gpt-4", "n_queries": 200},
    )


def test_mmc_mean_wait_matches_erlang_c():
    lam, mean_s, c = 3.2, 1.0, 4  # rho = 0.8
    sc = _single_queue({"kind": "exponential", "mean_s": mean_s}, lam, 2, 2, 6000.0)
    waits = replicate_mean_waits(sc, R)
    theory = erlang_c_wait(lam, 1 / mean_s, c)
    se = waits.std(ddof=1) / math.sqrt(R)
    assert abs(waits.mean() - theory) < 4.5 * se, (waits.mean(), theory, se)
    # And the interval is informative: a 20% error would have been caught.
    assert 4.5 * se < 0.2 * theory


def test_md1_mean_wait_matches_pollaczek_khinchine():
    lam, d = 0.7, 1.0
    sc = _single_queue({"kind": "deterministic", "mean_s": d}, lam, 1, 1, 8000.0)
    waits = replicate_mean_waits(sc, R)
    theory = pk_wait_deterministic(lam, d)
    se = waits.std(ddof=1) / math.sqrt(R)
    assert abs(waits.mean() - theory) < 4.5 * se, (waits.mean(), theory, se)
    assert 4.5 * se < 0.2 * theory
    # M/D/1 waits are half of M/M/1's at the same load: the service override is honoured.
    assert waits.mean() < 0.75 * erlang_c_wait(lam, 1 / d, 1)


@pytest.mark.parametrize("c", [1, 8])
def test_erlang_c_formula_sanity(c):
    # M/M/1 closed form: Wq = rho / (mu - lam)
    if c == 1:
        assert erlang_c_wait(0.5, 1.0, 1) == pytest.approx(0.5 / 0.5)
    else:
        assert 0 < erlang_c_wait(6.0, 1.0, 8) < 1.0
