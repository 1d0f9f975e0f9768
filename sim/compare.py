"""Comparison of policies across seeds: means with 95% confidence intervals, and paired
differences against a baseline policy.

Every seed gives every policy the same arrivals, queries and user behaviour (common random
numbers), so on one seed the difference `policy - baseline` cancels most of what makes seeds
differ. The interval of the mean paired difference over the seeds both policies ran is then
much tighter than the two policies' own intervals suggest; a difference whose interval
excludes 0 is one the seeds agree on.

Intervals are Student-t intervals, mean +/- t_{n-1, 0.975} * sd / sqrt(n): the replications
are independent, and each is itself an average over thousands of requests, so near-normal.
With one seed there is no interval (NaN).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from rich.markup import escape
from rich.table import Table
from scipy import stats

from sim.errors import RouteSimError


@dataclass(frozen=True)
class Metric:
    """A headline metric of summary.json and how the terminal shows it."""

    key: str
    label: str
    scale: float = 1.0  # display multiplier (fractions shown as %)
    digits: int = 1
    unit: str = ""


HEADLINE_METRICS: tuple[Metric, ...] = (
    Metric("quality_pct_of_reference", "quality %"),
    Metric("cost_pct_of_reference", "cost %"),
    Metric("total_cost_usd", "cost $", digits=2),
    Metric("mean_wait_s", "mean wait s", digits=2),
    Metric("p50_wait_s", "p50 wait s", digits=2),
    Metric("p95_wait_s", "p95 wait s", digits=2),
    Metric("p99_wait_s", "p99 wait s", digits=2),
    Metric("p95_latency_s", "p95 latency s", digits=2),
    Metric("slo_attainment", "SLO attainment", scale=100.0, unit="%"),
    Metric("rejected_or_abandoned_share", "rejected+abandoned", scale=100.0, unit="%"),
)
METRICS_BY_KEY: dict[str, Metric] = {m.key: m for m in HEADLINE_METRICS}

# The columns the terminal shows (the rest are in summary.parquet and the HTML report).
TABLE_METRICS: tuple[str, ...] = (
    "quality_pct_of_reference",
    "cost_pct_of_reference",
    "p95_wait_s",
    "slo_attainment",
    "rejected_or_abandoned_share",
)

COMPARISON_SCHEMA: dict[str, Any] = {
    "scenario": pl.Utf8,
    "policy": pl.Utf8,
    "metric": pl.Utf8,
    "n": pl.Int64,
    "mean": pl.Float64,
    "ci_low": pl.Float64,
    "ci_high": pl.Float64,
    "baseline": pl.Utf8,
    "n_paired": pl.Int64,
    "diff_mean": pl.Float64,
    "diff_ci_low": pl.Float64,
    "diff_ci_high": pl.Float64,
}


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of a Student-t interval; NaN bounds with fewer than 2 values."""
    x = np.asarray([v for v in values if v is not None and not _isnan(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _as_frame(summaries: pl.DataFrame | Sequence[Mapping[str, Any]]) -> pl.DataFrame:
    if isinstance(summaries, pl.DataFrame):
        return summaries
    from sim.runner import summaries_frame

    return summaries_frame(list(summaries))


def compare(
    summaries: pl.DataFrame | Sequence[Mapping[str, Any]],
    baseline: str | None = None,
    *,
    metrics: Sequence[str] = tuple(m.key for m in HEADLINE_METRICS),
    confidence: float = 0.95,
) -> pl.DataFrame:
    """One row per (scenario, policy, metric): mean and CI over seeds, and the paired
    difference (policy - baseline) over the seeds both ran, with its CI.

    `summaries` is summary.parquet's frame or a list of summary dicts. `baseline` is a policy
    label; default: each scenario's first policy. The baseline's own difference is null.
    """
    df = _as_frame(summaries)
    rows: list[dict[str, Any]] = []
    if df.is_empty():
        return pl.DataFrame(schema=COMPARISON_SCHEMA)
    missing = [k for k in ("scenario", "policy", "seed") if k not in df.columns]
    if missing:
        raise RouteSimError(
            f"summaries lack column(s) {', '.join(missing)}; expected summary.json rows",
            field="summaries",
        )
    metrics = [m for m in metrics if m in df.columns]
    for scenario in df["scenario"].unique(maintain_order=True).to_list():
        sdf = df.filter(pl.col("scenario") == scenario)
        policies = sdf["policy"].unique(maintain_order=True).to_list()
        base = baseline if baseline is not None else policies[0]
        if base not in policies:
            raise RouteSimError(
                f"baseline {base!r} did not run in scenario {scenario!r}; choose one of: "
                f"{', '.join(policies)}",
                field="--baseline",
            )
        by_seed = {p: _by_seed(sdf.filter(pl.col("policy") == p), metrics) for p in policies}
        for p in policies:
            for m in metrics:
                vals = list(by_seed[p][m].values())
                mean, lo, hi = t_interval(vals, confidence)
                n = sum(1 for v in vals if v is not None and not _isnan(v))
                d_mean = d_lo = d_hi = None
                n_paired = 0
                if p != base:
                    mine, theirs = by_seed[p][m], by_seed[base][m]
                    common = [s for s in mine if s in theirs and _ok(mine[s]) and _ok(theirs[s])]
                    diffs = [mine[s] - theirs[s] for s in common]
                    n_paired = len(diffs)
                    if diffs:
                        d_mean, d_lo, d_hi = t_interval(diffs, confidence)
                rows.append(
                    {
                        "scenario": scenario,
                        "policy": p,
                        "metric": m,
                        "n": n,
                        "mean": mean,
                        "ci_low": lo,
                        "ci_high": hi,
                        "baseline": base,
                        "n_paired": n_paired,
                        "diff_mean": d_mean,
                        "diff_ci_low": d_lo,
                        "diff_ci_high": d_hi,
                    }
                )
    return pl.DataFrame(rows, schema=COMPARISON_SCHEMA)


def _ok(v: Any) -> bool:
    return v is not None and not _isnan(v)


def _by_seed(df: pl.DataFrame, metrics: Sequence[str]) -> dict[str, dict[int, Any]]:
    out: dict[str, dict[int, Any]] = {m: {} for m in metrics}
    for r in df.iter_rows(named=True):
        for m in metrics:
            v = r[m]
            out[m][int(r["seed"])] = None if v is None else float(v)
    return out


def with_comparison(summary: pl.DataFrame, comparison: pl.DataFrame) -> pl.DataFrame:
    """summary.parquet's runs plus, on each run's row, its policy's across-seed statistics.

    Added columns per metric M: M__mean, M__ci_low, M__ci_high (over seeds) and M__diff,
    M__diff_ci_low, M__diff_ci_high (paired, vs the baseline); plus `baseline` and `n_seeds`.
    Each run keeps one row, so code that reads summary.parquet per run is unaffected.
    """
    if comparison.is_empty() or summary.is_empty():
        return summary
    wide = None
    for m in comparison["metric"].unique(maintain_order=True).to_list():
        part = comparison.filter(pl.col("metric") == m).select(
            "scenario",
            "policy",
            pl.col("mean").alias(f"{m}__mean"),
            pl.col("ci_low").alias(f"{m}__ci_low"),
            pl.col("ci_high").alias(f"{m}__ci_high"),
            pl.col("diff_mean").alias(f"{m}__diff"),
            pl.col("diff_ci_low").alias(f"{m}__diff_ci_low"),
            pl.col("diff_ci_high").alias(f"{m}__diff_ci_high"),
        )
        wide = part if wide is None else wide.join(part, on=["scenario", "policy"], how="left")
    extra = comparison.group_by("scenario", "policy", maintain_order=True).agg(
        pl.col("baseline").first(), pl.col("n").max().alias("n_seeds")
    )
    wide = wide.join(extra, on=["scenario", "policy"], how="left")
    drop = [c for c in wide.columns if c in summary.columns and c not in ("scenario", "policy")]
    return summary.drop(drop).join(wide, on=["scenario", "policy"], how="left")


# ---------------------------------------------------------------------------- terminal
def _fmt(v: float | None, metric: Metric, signed: bool = False) -> str:
    if v is None or _isnan(v):
        return "-"
    return f"{v * metric.scale:{'+' if signed else ''}.{metric.digits}f}"


def format_mean(row: Mapping[str, Any], metric: Metric) -> str:
    """'12.3 ± 0.4' (half-width of the CI), or '12.3' without an interval."""
    mean = _fmt(row["mean"], metric)
    lo, hi = row["ci_low"], row["ci_high"]
    if lo is None or _isnan(lo) or mean == "-":
        return mean + (metric.unit if mean != "-" else "")
    half = (hi - lo) / 2 * metric.scale
    return f"{mean} ± {half:.{metric.digits}f}{metric.unit}"


def format_diff(row: Mapping[str, Any], metric: Metric) -> str:
    """'+1.2 [+0.8, +1.6]' (CI of the mean paired difference); '*' marks a CI excluding 0."""
    d = row["diff_mean"]
    if d is None or _isnan(d):
        return "-"
    lo, hi = row["diff_ci_low"], row["diff_ci_high"]
    text = _fmt(d, metric, signed=True)
    if lo is None or _isnan(lo):
        return text
    sure = "*" if (lo > 0 or hi < 0) else ""
    return f"{text} [{_fmt(lo, metric, True)}, {_fmt(hi, metric, True)}]{sure}"


def compare_tables(
    comparison: pl.DataFrame,
    *,
    title: str = "",
    upper_bound: Sequence[str] = (),
    metrics: Sequence[str] = TABLE_METRICS,
) -> list[Table]:
    """Rich tables: per policy mean ± 95% CI; with several seeds, paired differences vs the
    baseline with their 95% CI. `upper_bound` policies are labelled as such."""
    tables: list[Table] = []
    if comparison.is_empty():
        return tables
    metrics = [m for m in metrics if m in set(comparison["metric"].to_list())]
    for scenario in comparison["scenario"].unique(maintain_order=True).to_list():
        c = comparison.filter(pl.col("scenario") == scenario)
        policies = c["policy"].unique(maintain_order=True).to_list()
        cell = {(r["policy"], r["metric"]): r for r in c.iter_rows(named=True)}
        seeds = int(c["n"].max() or 0)
        base = c["baseline"][0]
        t = Table(title=title or f"{scenario}: mean ± 95% CI over {seeds} seed(s)")
        t.add_column("policy")
        for m in metrics:
            t.add_column(METRICS_BY_KEY[m].label if m in METRICS_BY_KEY else m, justify="right")
        t.add_column("seeds", justify="right")
        for p in policies:
            # Labels are text, not rich markup: "mixllm[beta=0]" must not lose "[beta=0]".
            name = escape(p + (" (upper bound)" if p in upper_bound else ""))
            vals = [format_mean(cell[(p, m)], _metric(m)) for m in metrics]
            # Seeds run (a metric undefined in some seeds, e.g. with nothing measured, has
            # fewer values).
            n_p = max((int(cell[(p, m)]["n"] or 0) for m in metrics), default=0)
            t.add_row(name, *vals, str(n_p) if metrics else "")
        tables.append(t)
        if seeds > 1:
            d = Table(
                title=f"{scenario}: paired difference vs {escape(base)} (same seeds), mean "
                f"[95% CI]; * = CI excludes 0",
            )
            d.add_column("policy")
            for m in metrics:
                d.add_column("Δ " + _metric(m).label, justify="right")
            for p in policies:
                if p == base:
                    continue
                name = escape(p + (" (upper bound)" if p in upper_bound else ""))
                d.add_row(name, *[format_diff(cell[(p, m)], _metric(m)) for m in metrics])
            tables.append(d)
    return tables


def _metric(key: str) -> Metric:
    return METRICS_BY_KEY.get(key, Metric(key, key))


def upper_bound_policies(summary: pl.DataFrame) -> list[str]:
    """Policies that see ground truth (labelled upper bounds)."""
    if "upper_bound" not in summary.columns or summary.is_empty():
        return []
    return summary.filter(pl.col("upper_bound").fill_null(False))["policy"].unique().to_list()
