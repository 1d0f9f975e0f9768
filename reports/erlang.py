"""M/M/c (Erlang C) waiting-time formulas, and the pointwise-stationary sizing of one LLM.

For c servers, arrival rate lam and mean service time s (offered load a = lam * s < c):

    P(wait > 0) = C(c, a) = B / (1 - (a / c) * (1 - B)),  B = Erlang B(c, a)
    P(wait > t) = C(c, a) * exp(-(c / s - lam) * t)

(Kleinrock, Queueing Systems vol. 1, section 3.5; Erlang B by its stable recursion
B(0) = 1, B(k) = a B(k-1) / (k + a B(k-1))).

Time-varying load is handled by the pointwise stationary approximation (Green & Kolesar,
Management Science 1991): each time window is treated as a stationary M/M/c at its own
rate, and the share of requests waiting longer than t is the request-weighted mean of the
windows' P(wait > t). A window whose load reaches capacity counts as all-late.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def erlang_b(c: int, a: float) -> float:
    """Blocking probability of M/M/c/c with offered load a (Erlang)."""
    if c < 0 or a < 0:
        raise ValueError(f"erlang_b needs c >= 0 and a >= 0, got c={c}, a={a}")
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    return b


def erlang_c(c: int, a: float) -> float:
    """P(wait > 0) in M/M/c with offered load a < c; 1.0 when a >= c (unstable)."""
    if a <= 0:
        return 0.0
    if a >= c:
        return 1.0
    b = erlang_b(c, a)
    return b / (1.0 - (a / c) * (1.0 - b))


def wait_exceeds(c: int, lam: float, mean_service_s: float, t: float) -> float:
    """P(wait > t) in M/M/c (FCFS); 1.0 when unstable."""
    if lam <= 0:
        return 0.0
    a = lam * mean_service_s
    if a >= c:
        return 1.0
    return erlang_c(c, a) * math.exp(-(c / mean_service_s - lam) * t)


def late_share(
    c: int, rates: Sequence[float], weights: Sequence[float], mean_service_s: float, t: float
) -> float:
    """Request-weighted share waiting longer than t over windows of rates (PSA)."""
    total = float(sum(weights))
    if total <= 0:
        return 0.0
    return sum(w * wait_exceeds(c, lam, mean_service_s, t)
               for lam, w in zip(rates, weights, strict=True)) / total


def replicas_for(
    rates: Sequence[float],
    weights: Sequence[float],
    mean_service_s: float,
    slots: int,
    slo_wait_s: float,
    *,
    quantile: float = 0.95,
    max_replicas: int,
) -> int | None:
    """Fewest replicas (of `slots` servers each) whose PSA share of requests waiting longer
    than `slo_wait_s` is at most 1 - quantile; None if even `max_replicas` is not enough."""
    for r in range(1, max_replicas + 1):
        if late_share(r * slots, rates, weights, mean_service_s, slo_wait_s) <= 1.0 - quantile:
            return r
    return None
