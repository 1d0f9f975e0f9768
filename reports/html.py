"""`report.html`: one self-contained, offline HTML report of everything under a run directory.

Per scenario found under OUT: the quality-cost frontier with single-LLM points, wait and
latency CDFs per policy, queue length per LLM over time with the scenario's events marked,
route share over time, cumulative cost, SLO attainment and saturation labels, and the
summary table (mean, 95% CI over seeds, paired differences vs a baseline). Reads only the
files the runs wrote (reports.rundata); writes OUT/report.html atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl

from reports import figures
from reports.page import Page, esc
from reports.rundata import ScenarioRuns, discover_runs
from reports.single_llm import single_llm_points
from sim.compare import METRICS_BY_KEY, compare, format_diff, format_mean, upper_bound_policies
from sim.errors import RouteSimError

REQUEST_COLUMNS = [
    "arrival_s", "llm", "outcome", "wait_s", "latency_s", "cost_usd", "end_s", "ref_cost_usd",
]
SUMMARY_COLUMNS = (
    "quality_pct_of_reference",
    "cost_pct_of_reference",
    "total_cost_usd",
    "p95_wait_s",
    "p99_wait_s",
    "p95_latency_s",
    "slo_attainment",
    "rejected_or_abandoned_share",
)
DIFF_COLUMNS = ("quality_pct_of_reference", "cost_pct_of_reference", "p95_wait_s",
                "slo_attainment")


def write_run_report(out_dir: Path, *, baseline: str | None = None) -> Path:
    """Write OUT/report.html for every run under `out_dir`; return its path.

    `baseline`: policy the summary table's paired differences are taken against; default:
    the one `routesim run --baseline` recorded in OUT/summary.parquet, else each
    scenario's first policy. A directory without runs, or a `baseline` that is a policy of
    no scenario, raises RouteSimError.
    """
    out = Path(out_dir)
    scenarios = discover_runs(out)
    if baseline is not None and not any(baseline in s.policies for s in scenarios):
        choices = dict.fromkeys(p for s in scenarios for p in s.policies)
        raise RouteSimError(
            f"{baseline!r} is not a policy of the runs here; choose one of: "
            f"{', '.join(choices)}", source=str(out), field="--baseline")
    recorded = _recorded_baselines(out)
    page = Page(f"routesim report: {', '.join(s.name for s in scenarios)}")
    if len(scenarios) > 1:
        page.raw("<nav>" + "".join(
            f'<a href="#{esc(s.dir.name)}">{esc(s.name)}</a>' for s in scenarios) + "</nav>")
    for sr in scenarios:
        base = baseline if baseline in sr.policies else recorded.get(sr.name)
        _scenario_section(page, sr, base if base in sr.policies else sr.policies[0])
    return page.write(out / "report.html")


def _recorded_baselines(out: Path) -> dict[str, str]:
    path = out / "summary.parquet"
    if not path.is_file():
        return {}
    try:
        df = pl.read_parquet(path)
    except Exception:  # noqa: BLE001 - an unreadable optional file only loses the default
        return {}
    if "baseline" not in df.columns:
        return {}
    return {r["scenario"]: r["baseline"] for r in
            df.select("scenario", "baseline").drop_nulls().unique().iter_rows(named=True)}


def _scenario_section(page: Page, sr: ScenarioRuns, baseline: str) -> None:
    sc = sr.scenario
    page.heading(f"Scenario {sr.name}", 2, anchor=sr.dir.name)
    if sc is not None and sc.description:
        page.note(sc.description)
    n_seeds = len(sr.seeds)
    slo_text = f"SLO: p95 wait ≤ {sc.slo.p95_wait_s:g} s. " if sc else ""
    page.note(
        f"{len(sr.policies)} policies × {n_seeds} seed(s) (seeds {', '.join(map(str, sr.seeds))})"
        f". {slo_text}Metrics cover requests that arrived after the warm-up"
        + (f" ({sc.warmup_s:g} s)" if sc else "")
        + ". Quality and cost are % of the reference LLM's on the same queries; every seed "
        "gives every policy the same arrivals and queries, so differences are paired."
    )
    summaries = sr.summaries()
    upper = upper_bound_policies(summaries)
    pcol = figures.colour_map(sr.policies, figures.POLICY_COLOURS)
    first = sr.first_run(sr.policies[0])
    events = first.events()  # the scenario's events happen at the same times in every run
    lcol = figures.colour_map(_llm_order(sr), figures.LLM_COLOURS)
    requests = {p: _policy_requests(sr, p) for p in sr.policies}

    page.heading("Summary", 3)
    _summary_table(page, sr, summaries, baseline, upper)
    if not events.is_empty():
        page.heading("Events", 3)
        page.table(["t, s", "event", "LLM", "detail"], [
            [f"{r['t_s']:.0f}", r["kind"], r["llm"] or "-", r["detail"] or ""]
            for r in events.sort("t_s").iter_rows(named=True)
        ])
        page.note(f"As recorded in the run of {first.policy}, seed {first.seed} (details such as "
                  "the number of re-offered requests differ between runs).")

    page.heading("Quality vs cost", 3)
    singles, why = single_llm_points(sr)
    page.figure(figures.frontier_figure(sr, summaries, singles, upper, pcol))
    if why:
        page.note(why)
    else:
        page.note("Diamonds: every query sent to one LLM, on the same measured queries, at its "
                  "list price and without congestion. Routers below and right of the dotted "
                  "Pareto front are beaten by a single LLM or another router.")

    page.heading("Waiting and latency", 3)
    page.figure(figures.cdf_figure(sr, requests, pcol, kind="wait"))
    page.figure(figures.cdf_figure(sr, requests, pcol, kind="latency"))
    page.figure(figures.slo_figure(sr, summaries, pcol))
    page.figure(figures.saturation_figure(sr))

    page.heading("Over time", 3)
    page.figure(figures.queue_figure(sr, events, lcol))
    page.figure(figures.route_share_figure(sr, requests, events, lcol))
    page.figure(figures.cumulative_cost_figure(sr, requests, events, pcol))


def _llm_order(sr: ScenarioRuns) -> list[str]:
    if sr.scenario is not None:
        return [s.name for s in sr.scenario.all_llms()]
    names: list[str] = []
    for r in sr.runs:
        for llm in (r.summary.get("route_share") or {}):
            if llm not in names:
                names.append(llm)
    return names


def _policy_requests(sr: ScenarioRuns, policy: str) -> pl.DataFrame:
    """Requests of every seed of a policy, tagged with `seed` and `measured` (arrived after
    warm-up: what the summaries cover; the time series show the whole run)."""
    frames = []
    for run in sr.runs_of(policy):
        df = run.requests(REQUEST_COLUMNS).with_columns(pl.lit(run.seed).alias("seed"))
        frames.append(df)
    df = pl.concat(frames, how="vertical_relaxed")
    return df.with_columns((pl.col("arrival_s") >= sr.warmup_s).alias("measured"))


def _summary_table(
    page: Page, sr: ScenarioRuns, summaries: pl.DataFrame, baseline: str, upper: list[str]
) -> None:
    """Means with 95% CIs; paired differences vs the baseline (several seeds); route shares
    and saturation."""
    comp = compare(summaries, baseline, metrics=SUMMARY_COLUMNS)
    cell = {(r["policy"], r["metric"]): r for r in comp.iter_rows(named=True)}
    names = {p: p + (" (upper bound)" if p in upper else "") for p in sr.policies}
    page.table(
        ["policy", "seeds"] + [_label(m) for m in SUMMARY_COLUMNS],
        [[names[p], str(len(sr.runs_of(p)))]
         + [format_mean(cell[(p, m)], METRICS_BY_KEY[m]) for m in SUMMARY_COLUMNS]
         for p in sr.policies],
    )
    page.note("Mean ± half-width of the 95% t-interval over seeds.")
    if len(sr.seeds) > 1:
        page.table(
            ["policy"] + [f"Δ {_label(m)}" for m in DIFF_COLUMNS],
            [[names[p]] + ["baseline" if p == baseline else
                           format_diff(cell[(p, m)], METRICS_BY_KEY[m]) for m in DIFF_COLUMNS]
             for p in sr.policies],
        )
        page.note(f"Paired differences vs {baseline}: mean over the seeds both ran [95% CI]; "
                  "* marks an interval that excludes 0. Same seed = same arrivals, queries and "
                  "users, so these intervals are usually tighter than the means' above.")
    _, sat = figures.saturation_cells(sr)
    page.table(
        ["policy", "route share (mean over seeds)", "not stable (worst seed)"],
        [[names[p], _mean_shares(sr.runs_of(p)),
          ", ".join(f"{llm}: {lab}" for (pp, llm), lab in sat.items()
                    if pp == p and not lab.startswith("stable")) or "all stable"]
         for p in sr.policies],
    )


def _label(metric: str) -> str:
    return METRICS_BY_KEY[metric].label


def _mean_shares(runs) -> str:
    acc: dict[str, float] = {}
    for r in runs:
        share = r.summary.get("route_share") or {}
        if isinstance(share, str):
            share = json.loads(share)
        for k, v in share.items():
            acc[k] = acc.get(k, 0.0) + float(v) / len(runs)
    top = sorted(acc.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {100 * v:.0f}%" for k, v in top if not math.isnan(v) and v >= 0.005)
