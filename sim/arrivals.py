"""Arrival processes, generated for the whole run before it starts (vectorised).

Arrivals are exogenous: they do not depend on routing, so computing every timestamp up front
costs nothing in fidelity, gives every policy of one seed the same arrivals (common random
numbers) and keeps the event loop free of per-arrival random draws.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sim.errors import DataError
from sim.scenario import (
    MAX_EVENTS,
    Arrivals,
    DiurnalArrivals,
    MMPPArrivals,
    PiecewiseArrivals,
    PoissonArrivals,
    TraceArrivals,
)


def _poisson_segment(rate: float, start: float, end: float, rng: np.random.Generator) -> np.ndarray:
    """Homogeneous Poisson points on [start, end): Poisson count, then sorted uniforms."""
    if rate <= 0 or end <= start:
        return np.empty(0)
    n = rng.poisson(rate * (end - start))
    return np.sort(rng.uniform(start, end, size=n))


def poisson_times(rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    return _poisson_segment(rate, 0.0, duration_s, rng)


def piecewise_times(
    spec: PiecewiseArrivals, duration_s: float, rng: np.random.Generator
) -> np.ndarray:
    """Each phase is Poisson at its rate; the last phase's rate continues to duration_s."""
    parts = []
    for start, end, rate in phase_segments(spec, duration_s):
        parts.append(_poisson_segment(rate, start, end, rng))
    return np.concatenate(parts) if parts else np.empty(0)


def phase_segments(spec: PiecewiseArrivals, duration_s: float) -> list[tuple[float, float, float]]:
    """(start, end, rate) per phase, clipped to the run; the last rate runs to the end."""
    out = []
    start = 0.0
    last = len(spec.phases) - 1
    for i, ph in enumerate(spec.phases):
        end = min(ph.until_s if i < last else max(ph.until_s, duration_s), duration_s)
        if end > start:
            out.append((start, end, ph.rate_per_s))
        start = ph.until_s
        if start >= duration_s:
            break
    return out


def diurnal_rate(spec: DiurnalArrivals, t: np.ndarray) -> np.ndarray:
    return spec.mean_rate_per_s * (
        1.0 + spec.amplitude * np.sin(2.0 * np.pi * (t - spec.phase_s) / spec.period_s)
    )


def diurnal_times(spec: DiurnalArrivals, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Lewis-Shedler thinning: Poisson at the peak rate, keep each point w.p. rate(t)/peak."""
    peak = spec.mean_rate_per_s * (1.0 + spec.amplitude)
    cand = _poisson_segment(peak, 0.0, duration_s, rng)
    keep = rng.random(cand.size) * peak < diurnal_rate(spec, cand)
    return cand[keep]


def _jump_matrix(spec: MMPPArrivals) -> np.ndarray:
    """Row-stochastic state-jump probabilities: the given rows normalised, or uniform over
    the other states."""
    k = len(spec.states)
    if spec.transition is not None:
        trans = np.asarray(spec.transition, dtype=float)
        return trans / trans.sum(axis=1, keepdims=True)
    return (np.ones((k, k)) - np.eye(k)) / (k - 1)


def mmpp_times(spec: MMPPArrivals, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Markov-modulated Poisson: exponential sojourns, Poisson arrivals within each."""
    k = len(spec.states)
    trans = _jump_matrix(spec)
    parts = []
    t = 0.0
    state = spec.initial_state
    while t < duration_s:
        st = spec.states[state]
        end = min(t + rng.exponential(st.mean_sojourn_s), duration_s)
        parts.append(_poisson_segment(st.rate_per_s, t, end, rng))
        t = end
        state = int(rng.choice(k, p=trans[state]))
    return np.concatenate(parts) if parts else np.empty(0)


def _jump_stationary(spec: MMPPArrivals) -> np.ndarray:
    """Stationary distribution of the embedded jump chain (unique: validation refuses a
    transition matrix with more than one closed class of states)."""
    w, v = np.linalg.eig(_jump_matrix(spec).T)
    pi = np.real(v[:, np.argmin(np.abs(w - 1.0))])
    return pi / pi.sum()


def mmpp_mean_rate(spec: MMPPArrivals) -> float:
    """Long-run rate: state rates weighted by the stationary time share of each state."""
    pi = _jump_stationary(spec)
    soj = np.array([s.mean_sojourn_s for s in spec.states])
    share = pi * soj / (pi * soj).sum()
    return float(share @ np.array([s.rate_per_s for s in spec.states]))


def mmpp_expected_switches(spec: MMPPArrivals, duration_s: float) -> float:
    """Long-run number of state switches in `duration_s`: one per mean sojourn, the mean
    taken over the jump chain's stationary distribution."""
    pi = _jump_stationary(spec)
    soj = np.array([s.mean_sojourn_s for s in spec.states])
    return float(duration_s / (pi @ soj))


def trace_times(spec: TraceArrivals, duration_s: float) -> np.ndarray:
    """Timestamps from a CSV (seconds, any order), scaled, optionally looped."""
    import polars as pl

    path = Path(spec.path)
    if not path.is_file():
        raise DataError("trace file not found", source=str(path), field="arrivals.path")
    try:
        # Types from every row: whole seconds first and a fraction later is still a trace.
        df = pl.read_csv(path, infer_schema_length=None)
        if spec.column is None and df.columns and _is_number(df.columns[0]):
            # No header line: the first timestamp must not be taken for a column name.
            df = pl.read_csv(path, has_header=False, infer_schema_length=None)
    except Exception as exc:  # polars raises several types for malformed CSV
        raise DataError(
            f"cannot read CSV: {exc}", source=str(path), field="arrivals.path"
        ) from None
    col = spec.column or (df.columns[0] if df.columns else None)
    if col is None or col not in df.columns:
        raise DataError(
            f"column {col!r} not found; columns: {', '.join(df.columns)}",
            source=str(path),
            field="arrivals.column",
        )
    if df[col].dtype == pl.Boolean:  # true/false would cast to 1/0 seconds
        raise DataError(
            f"column {col!r} holds true/false values, not timestamps in seconds",
            source=str(path),
            field="arrivals.column",
        )
    try:
        t = df[col].cast(pl.Float64, strict=True).to_numpy()
    except Exception:
        raise DataError(
            f"column {col!r} must hold numeric timestamps in seconds",
            source=str(path),
            field="arrivals.column",
        ) from None
    if t.size == 0:
        raise DataError(
            f"column {col!r} has no timestamps (the file has a header and no rows)",
            source=str(path),
            field="arrivals.path",
        )
    if not np.isfinite(t).all() or (t < 0).any():
        raise DataError(
            f"column {col!r} has missing, infinite or negative timestamps; finite seconds "
            ">= 0 required",
            source=str(path),
            field="arrivals.column",
        )
    t = np.sort(t)
    if spec.shift_to_zero and t.size:
        t = t - t[0]
    t = t * spec.time_scale
    if t.size and spec.loop:
        if t[-1] <= t[0]:
            raise DataError(
                "loop needs at least two distinct timestamps (the trace has no length)",
                source=str(path),
                field="arrivals.loop",
            )
        # One pass lasts from its first arrival to its last plus a typical gap, so passes
        # join without piling arrivals on one instant; simultaneous arrivals are kept.
        gaps = np.diff(t)
        period = float(t[-1] - t[0] + np.median(gaps[gaps > 0]))
        reps = np.ceil(duration_s / period) + 1
        if reps * t.size > MAX_EVENTS:
            raise DataError(
                f"looping this trace ({t.size} timestamps over {period:.3g} s after "
                f"time_scale) to duration_s={duration_s:g} gives {reps * t.size:.3g} "
                f"arrivals; at most {MAX_EVENTS:.0e} per run (raise arrivals.time_scale or "
                "shorten the run)",
                source=str(path),
                field="arrivals.loop",
            )
        t = np.concatenate([t + i * period for i in range(int(reps))])
    if t.size and not (t < duration_s).any():
        raise DataError(
            f"no timestamp falls in the run: the first is {t[0]:g} s (after time_scale) and "
            f"duration_s is {duration_s:g}; timestamps are seconds from the run's start, or "
            "set arrivals.shift_to_zero: true for absolute times (e.g. Unix epoch)",
            source=str(path),
            field="arrivals.path",
        )
    return t[t < duration_s]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def arrival_times(spec: Arrivals, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """All arrival timestamps in [0, duration_s), sorted, float64."""
    if isinstance(spec, PoissonArrivals):
        t = poisson_times(spec.rate_per_s, duration_s, rng)
    elif isinstance(spec, PiecewiseArrivals):
        t = piecewise_times(spec, duration_s, rng)
    elif isinstance(spec, DiurnalArrivals):
        t = diurnal_times(spec, duration_s, rng)
    elif isinstance(spec, MMPPArrivals):
        t = mmpp_times(spec, duration_s, rng)
    elif isinstance(spec, TraceArrivals):
        t = trace_times(spec, duration_s)
    else:  # pragma: no cover - the scenario union is closed
        raise TypeError(type(spec))
    return np.asarray(t, dtype=np.float64)


def expected_count(spec: Arrivals, duration_s: float) -> float | None:
    """Expected number of arrivals (None for traces, which are data); for MMPP the long-run
    value, which ignores `initial_state`."""
    if isinstance(spec, PoissonArrivals):
        return spec.rate_per_s * duration_s
    if isinstance(spec, PiecewiseArrivals):
        total = sum((e - s0) * r for s0, e, r in phase_segments(spec, duration_s))
        return total
    if isinstance(spec, DiurnalArrivals):
        # Integral of the sinusoid over [0, D].
        w = 2.0 * np.pi / spec.period_s
        integral = (np.cos(w * (0 - spec.phase_s)) - np.cos(w * (duration_s - spec.phase_s))) / w
        return spec.mean_rate_per_s * (duration_s + spec.amplitude * integral)
    if isinstance(spec, MMPPArrivals):
        # Long-run: from the stationary state shares, whatever the initial state (exact
        # only for runs much longer than the sojourns).
        return mmpp_mean_rate(spec) * duration_s
    return None
