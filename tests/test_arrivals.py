"""Arrival processes produce the rates they promise.

Tolerances: the number of points of a (possibly inhomogeneous) Poisson process on a window is
Poisson with mean E = integral of the rate, so |N - E| < 4 sqrt(E) fails with probability
~6e-5. MMPP counts are over-dispersed (the modulating chain adds variance), so for MMPP we
use R independent replications and the empirical standard error of their mean.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sim.arrivals import arrival_times, diurnal_rate, expected_count, mmpp_mean_rate
from sim.errors import DataError
from sim.scenario import (
    DiurnalArrivals,
    MMPPArrivals,
    PiecewiseArrivals,
    PoissonArrivals,
    TraceArrivals,
)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def within_poisson(n: int, expected: float) -> bool:
    return abs(n - expected) < 4 * math.sqrt(expected)


def test_poisson_count_and_order():
    spec = PoissonArrivals(kind="poisson", rate_per_s=5.0)
    t = arrival_times(spec, 2000.0, rng())
    assert within_poisson(t.size, 10_000)
    assert np.all(np.diff(t) >= 0) and t.min() >= 0 and t.max() < 2000.0
    # Exponential inter-arrivals: coefficient of variation 1. By the delta method the sample
    # CV of n exponential gaps has sd 1/sqrt(n) (central moments 1, 2, 9: (9 - 1)/4 - 2 + 1).
    gaps = np.diff(t)
    assert abs(gaps.std() / gaps.mean() - 1) < 4 * math.sqrt(1 / gaps.size)


def test_piecewise_phase_counts():
    spec = PiecewiseArrivals(
        kind="piecewise",
        phases=[{"until_s": 1000, "rate_per_s": 2.0}, {"until_s": 1500, "rate_per_s": 10.0},
                {"until_s": 3000, "rate_per_s": 1.0}],
    )
    t = arrival_times(spec, 3000.0, rng(1))
    for lo, hi, rate in [(0, 1000, 2.0), (1000, 1500, 10.0), (1500, 3000, 1.0)]:
        n = int(((t >= lo) & (t < hi)).sum())
        assert within_poisson(n, rate * (hi - lo)), (lo, hi, n)
    assert expected_count(spec, 3000.0) == pytest.approx(2000 + 5000 + 1500)


def test_piecewise_last_rate_continues_and_clips():
    spec = PiecewiseArrivals(kind="piecewise", phases=[{"until_s": 100, "rate_per_s": 3.0}])
    t = arrival_times(spec, 1000.0, rng(2))
    assert within_poisson(t.size, 3000)
    assert expected_count(spec, 50.0) == pytest.approx(150.0)


def test_diurnal_thinning_follows_the_rate():
    spec = DiurnalArrivals(kind="diurnal", mean_rate_per_s=4.0, amplitude=0.8, period_s=1000.0)
    t = arrival_times(spec, 10_000.0, rng(3))
    assert within_poisson(t.size, expected_count(spec, 10_000.0))
    # Counts in the high half of each period vs the low half, against the integrated rate.
    phase = np.mod(t, 1000.0)
    high = int((phase < 500).sum())
    grid = np.linspace(0, 500, 5001)[:-1] + 0.05
    e_high = 10 * float(diurnal_rate(spec, grid).mean() * 500)
    assert within_poisson(high, e_high)
    assert high > 1.5 * (t.size - high)


def test_mmpp_long_run_rate_over_replications():
    spec = MMPPArrivals(
        kind="mmpp",
        states=[{"rate_per_s": 1.0, "mean_sojourn_s": 100.0},
                {"rate_per_s": 6.0, "mean_sojourn_s": 50.0}],
    )
    theory = mmpp_mean_rate(spec)
    assert theory == pytest.approx((1.0 * 100 + 6.0 * 50) / 150)
    reps = 30
    rates = np.array([arrival_times(spec, 5000.0, rng(10 + r)).size / 5000.0
                      for r in range(reps)])
    se = rates.std(ddof=1) / math.sqrt(reps)
    assert abs(rates.mean() - theory) < 4.5 * se


def test_mmpp_three_states_with_transition_matrix():
    spec = MMPPArrivals(
        kind="mmpp",
        states=[{"rate_per_s": 0.0, "mean_sojourn_s": 10.0},
                {"rate_per_s": 2.0, "mean_sojourn_s": 10.0},
                {"rate_per_s": 8.0, "mean_sojourn_s": 10.0}],
        transition=[[0, 1, 0], [0, 0, 1], [1, 0, 0]],
    )
    assert mmpp_mean_rate(spec) == pytest.approx(10 / 3)
    rates = np.array([arrival_times(spec, 3000.0, rng(50 + r)).size / 3000 for r in range(20)])
    se = rates.std(ddof=1) / math.sqrt(20)
    assert abs(rates.mean() - 10 / 3) < 4.5 * se


def test_trace_replay_scale_and_loop(tmp_path):
    p = tmp_path / "trace.csv"
    p.write_text("t\n0.5\n2.0\n1.0\n9.0\n")
    spec = TraceArrivals(kind="trace", path=str(p))
    assert arrival_times(spec, 100.0, rng()).tolist() == [0.5, 1.0, 2.0, 9.0]
    fast = TraceArrivals(kind="trace", path=str(p), time_scale=0.5)
    assert arrival_times(fast, 100.0, rng()).tolist() == [0.25, 0.5, 1.0, 4.5]
    looped = TraceArrivals(kind="trace", path=str(p), loop=True)
    t = arrival_times(looped, 30.0, rng())
    assert t[:4].tolist() == [0.5, 1.0, 2.0, 9.0] and t.max() < 30.0 and t.size > 8
    assert arrival_times(spec, 1.5, rng()).tolist() == [0.5, 1.0]


@pytest.mark.parametrize(
    "content, match",
    [("t\n1\nabc\n", "numeric"), ("t\n1\n-3\n", "negative")],
)
def test_trace_bad_values(tmp_path, content, match):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(DataError, match=match) as exc:
        arrival_times(TraceArrivals(kind="trace", path=str(p)), 10.0, rng())
    assert str(p) in str(exc.value) and "arrivals.column" in str(exc.value)


def test_trace_missing_file_and_column(tmp_path):
    with pytest.raises(DataError, match="not found"):
        arrival_times(TraceArrivals(kind="trace", path=str(tmp_path / "no.csv")), 10.0, rng())
    p = tmp_path / "t.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="column 'zz' not found; columns: a, b"):
        arrival_times(TraceArrivals(kind="trace", path=str(p), column="zz"), 10.0, rng())


def test_same_seed_same_arrivals():
    spec = PoissonArrivals(kind="poisson", rate_per_s=3.0)
    assert np.array_equal(arrival_times(spec, 100, rng(5)), arrival_times(spec, 100, rng(5)))
    assert not np.array_equal(arrival_times(spec, 100, rng(5)), arrival_times(spec, 100, rng(6)))


def test_trace_with_absolute_times_and_mixed_number_formats(tmp_path):
    # Epoch seconds land after any run: a clear error, or shifted to start at 0 on request.
    p = tmp_path / "epoch.csv"
    p.write_text("t\n1700000000.5\n1700000001.5\n1700000003.0\n")
    with pytest.raises(DataError, match="shift_to_zero") as exc:
        arrival_times(TraceArrivals(kind="trace", path=str(p)), 100.0, rng())
    assert str(p) in str(exc.value)
    shifted = TraceArrivals(kind="trace", path=str(p), shift_to_zero=True, time_scale=2.0)
    assert arrival_times(shifted, 100.0, rng()).tolist() == [0.0, 2.0, 5.0]
    # Whole seconds for the first 200 rows, then a fraction: read as one numeric column
    # (column types are inferred from every row, not the first 100).
    q = tmp_path / "mixed.csv"
    q.write_text("t\n" + "".join(f"{i}\n" for i in range(200)) + "200.5\n")
    t = arrival_times(TraceArrivals(kind="trace", path=str(q)), 1000.0, rng())
    assert t.size == 201 and t[-1] == 200.5
