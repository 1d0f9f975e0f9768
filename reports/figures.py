"""Figures of one scenario's runs, built from the files the runs wrote (plotly).

Colours are stable within a report: one per policy, one per LLM. Time-series figures mark
the scenario's events (LLMs added or removed, outages and recoveries, price and mix changes)
with dashed vertical lines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import polars as pl
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from reports.rundata import ScenarioRuns
from reports.single_llm import SingleLLMPoint
from sim.metrics import admitted_waits

POLICY_COLOURS = qualitative.Plotly + qualitative.T10
LLM_COLOURS = qualitative.D3 + qualitative.Dark2 + qualitative.Set2
SATURATION_ORDER = ("stable", "backlogged", "overloaded")
SATURATION_COLOURS = {"stable": "#74c476", "backlogged": "#fd8d3c", "overloaded": "#de2d26"}
CDF_POINTS = 201  # quantiles drawn per CDF (keeps the page small whatever the run size)
MAX_LINE_POINTS = 600
FACET_HEIGHT = 190


def colour_map(names: Sequence[str], palette: Sequence[str]) -> dict[str, str]:
    return {n: palette[i % len(palette)] for i, n in enumerate(names)}


def _layout(fig: go.Figure, title: str, height: int = 430) -> go.Figure:
    # room above the plot for event labels (stacked over two rows, see mark_events)
    events = any(a.name == "event" for a in fig.layout.annotations)
    fig.update_layout(
        title={"text": title, "x": 0.0, "xanchor": "left"},
        template="plotly_white",
        height=height + (50 if events else 0),
        margin={"l": 70, "r": 30, "t": 120 if events else 70, "b": 50},
        legend={"tracegroupgap": 2},
    )
    return fig


# ------------------------------------------------------------------------------- events
def mark_events(fig: go.Figure, events: pl.DataFrame) -> None:
    """Dashed vertical lines over the whole figure height (every facet of a figure with
    shared x axes), one per event time, labelled."""
    if events.is_empty():
        return
    by_t: dict[float, list[str]] = {}
    for r in events.sort("t_s").iter_rows(named=True):
        label = r["kind"] + (f" {r['llm']}" if r["llm"] else "")
        if r["kind"] in ("mix_change", "price_change", "outage"):
            label += f" ({r['detail']})" if r["kind"] != "price_change" else f": {r['detail']}"
        by_t.setdefault(round(float(r["t_s"]), 3), []).append(label)
    for i, (t, labels) in enumerate(sorted(by_t.items())):
        fig.add_shape(
            type="line", x0=t, x1=t, xref="x", y0=0, y1=1, yref="paper",
            line={"color": "rgba(60,60,60,0.7)", "dash": "dash", "width": 1},
        )
        # above any facet title; neighbouring events alternate between two rows
        fig.add_annotation(
            x=t, xref="x", y=1.0, yref="paper", yshift=22 + 16 * (i % 2),
            text=" / ".join(labels), name="event", showarrow=False, xanchor="left",
            yanchor="bottom", font={"size": 10}, bgcolor="rgba(255,255,255,0.7)",
        )


# ------------------------------------------------------------------------------ frontier
def frontier_figure(
    runs: ScenarioRuns,
    summaries: pl.DataFrame,
    singles: Sequence[SingleLLMPoint],
    upper_bound: Sequence[str],
    colours: Mapping[str, str],
) -> go.Figure:
    """Quality vs cost (% of the reference LLM): each policy's seeds and mean with 95% CI,
    every LLM alone, and the Pareto front of the non-oracle points."""
    from sim.compare import compare

    ref = runs.scenario.workload.reference_llm if runs.scenario else "reference"
    fig = go.Figure()
    comp = compare(summaries, metrics=["quality_pct_of_reference", "cost_pct_of_reference"])
    stat = {(r["policy"], r["metric"]): r for r in comp.iter_rows(named=True)}
    front_pts: list[tuple[float, float, str]] = []
    for p in runs.policies:
        s = summaries.filter(pl.col("policy") == p)
        name = p + (" (upper bound)" if p in upper_bound else "")
        q, c = stat[(p, "quality_pct_of_reference")], stat[(p, "cost_pct_of_reference")]
        if q["mean"] is None or c["mean"] is None or math.isnan(q["mean"]):
            continue
        if s.height > 1:
            fig.add_trace(go.Scatter(
                x=s["cost_pct_of_reference"].to_list(), y=s["quality_pct_of_reference"].to_list(),
                mode="markers", name=f"{name} (per seed)", legendgroup=p, showlegend=False,
                marker={"color": colours[p], "size": 6, "opacity": 0.35},
                hovertemplate=f"{p}<br>cost %{{x:.1f}}%<br>quality %{{y:.1f}}%<extra>seed</extra>",
            ))
        err_x = err_y = None
        if q["ci_low"] is not None and not math.isnan(q["ci_low"]):
            err_y = {"type": "data", "symmetric": False,
                     "array": [q["ci_high"] - q["mean"]], "arrayminus": [q["mean"] - q["ci_low"]]}
            err_x = {"type": "data", "symmetric": False,
                     "array": [c["ci_high"] - c["mean"]], "arrayminus": [c["mean"] - c["ci_low"]]}
        fig.add_trace(go.Scatter(
            x=[c["mean"]], y=[q["mean"]], mode="markers", name=name, legendgroup=p,
            marker={"color": colours[p], "size": 13,
                    "symbol": "star-open" if p in upper_bound else "circle",
                    "line": {"width": 1, "color": "#333"}},
            error_x=err_x, error_y=err_y,
            hovertemplate=f"{name}<br>cost %{{x:.1f}}%<br>quality %{{y:.1f}}%<extra></extra>",
        ))
        if p not in upper_bound:
            front_pts.append((c["mean"], q["mean"], p))
    if singles:
        fig.add_trace(go.Scatter(
            x=[s.cost_pct for s in singles], y=[s.quality_pct for s in singles],
            mode="markers+text", name="one LLM for every query",
            text=[s.llm for s in singles], textposition="top center", textfont={"size": 10},
            marker={"symbol": "diamond", "size": 10, "color": "#777"},
            hovertemplate="all to %{text}<br>cost %{x:.1f}%<br>quality %{y:.1f}%<extra></extra>",
        ))
        front_pts += [(s.cost_pct, s.quality_pct, s.llm) for s in singles]
    front = pareto_front(front_pts)
    if len(front) > 1:
        fig.add_trace(go.Scatter(
            x=[f[0] for f in front], y=[f[1] for f in front], mode="lines",
            name="Pareto front (excl. upper bounds)", line={"dash": "dot", "color": "#999"},
            hoverinfo="skip",
        ))
    fig.update_xaxes(**cost_axis([x for tr in fig.data for x in (tr.x or ())],
                                 f"cost, % of sending every query to {ref}"))
    fig.update_yaxes(title=f"quality, % of {ref}'s")
    return _layout(fig, "Quality vs cost: routers (mean, 95% CI over seeds) and single LLMs",
                   height=520)


def cost_axis(costs: Sequence[float], title: str) -> dict:
    """A log cost axis (costs span orders of magnitude), unless a point costs nothing
    (self-hosted LLMs at zero price): a log axis cannot show it, so the axis is linear."""
    if any(c is not None and c <= 0 for c in costs):
        return {"title": f"{title} (linear scale: some points cost 0%)", "type": "linear"}
    return {"title": f"{title} (log scale)", "type": "log"}


def pareto_front(points: Sequence[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points no other point beats on both cost (lower) and quality (higher), by cost."""
    front: list[tuple[float, float, str]] = []
    best = -math.inf
    for c, q, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if q > best:
            front.append((c, q, name))
            best = q
    return front


# ---------------------------------------------------------------------------------- CDFs
def _quantile_curve(x: np.ndarray) -> tuple[list[float], list[float]]:
    p = np.linspace(0.0, 1.0, CDF_POINTS)
    return np.quantile(x, p).tolist(), p.tolist()


def cdf_figure(
    runs: ScenarioRuns,
    requests: Mapping[str, pl.DataFrame],
    colours: Mapping[str, str],
    *,
    kind: str,
) -> go.Figure:
    """Empirical CDF per policy (seeds pooled) of the wait or of the latency."""
    fig = go.Figure()
    slo = runs.scenario.slo.p95_wait_s if runs.scenario else None
    for p in runs.policies:
        m = requests[p].filter(pl.col("measured"))
        if kind == "wait":
            vals = admitted_waits(m)
            vals = vals[~np.isnan(vals)]
        else:
            vals = m.filter(pl.col("outcome") == "completed")["latency_s"].drop_nans().to_numpy()
        if vals.size == 0:
            continue
        xs, ps = _quantile_curve(vals)
        fig.add_trace(go.Scatter(
            x=xs, y=ps, mode="lines", name=p, line={"color": colours[p], "shape": "hv"},
            hovertemplate=f"{p}<br>%{{x:.2f}} s<br>P = %{{y:.3f}}<extra></extra>",
        ))
    if kind == "wait":
        if slo is not None:
            fig.add_vline(x=slo, line={"dash": "dash", "color": "#c00"},
                          annotation_text=f"SLO p95 wait {slo:g} s", annotation_position="top")
        fig.add_hline(y=0.95, line={"dash": "dot", "color": "#999"})
        fig.update_xaxes(title="wait before service, s (admitted requests, as the summary's "
                         "p95: rejections left out, abandonments at the wait given up, in "
                         "flight at the wait so far)")
        title = "Wait CDF per policy (requests after warm-up, seeds pooled)"
    else:
        fig.update_xaxes(title="latency (arrival to last token), s, log scale", type="log")
        title = "Latency CDF per policy (completed requests after warm-up, seeds pooled)"
    fig.update_yaxes(title="share of requests ≤ x", range=[0, 1.02])
    return _layout(fig, title)


# ---------------------------------------------------------------------------- timelines
def queue_figure(
    runs: ScenarioRuns, events: pl.DataFrame, llm_colours: Mapping[str, str]
) -> go.Figure:
    """Queue length per LLM over time, one panel per policy (its first seed)."""
    pols = runs.policies
    fig = make_subplots(rows=len(pols), cols=1, shared_xaxes=True, vertical_spacing=0.04,
                        subplot_titles=[f"{p} (seed {runs.first_run(p).seed})" for p in pols])
    shown: set[str] = set()
    for i, p in enumerate(pols, start=1):
        tl = runs.first_run(p).timeline()
        for llm in tl["llm"].unique(maintain_order=True).to_list():
            s = tl.filter(pl.col("llm") == llm)
            fig.add_trace(go.Scatter(
                x=s["t_s"].to_list(), y=s["queue_len"].to_list(), mode="lines", name=llm,
                legendgroup=llm, showlegend=llm not in shown,
                line={"color": llm_colours.get(llm, "#444"), "width": 1.5},
                hovertemplate=f"{llm}<br>t=%{{x:.0f}} s<br>queue %{{y}}<extra>{p}</extra>",
            ), row=i, col=1)
            shown.add(llm)
        fig.update_yaxes(title_text="queued", rangemode="nonnegative", row=i, col=1)
    fig.update_xaxes(title_text="time, s", row=len(pols), col=1)
    mark_events(fig, events)  # facets share x; lines span all
    return _layout(fig, "Queue length per LLM over time (events dashed)",
                   height=110 + FACET_HEIGHT * len(pols))


def _bin_width(runs: ScenarioRuns) -> float:
    dur = runs.scenario.duration_s if runs.scenario else 3600.0
    step = runs.scenario.run.sample_every_s if runs.scenario else 10.0
    return max(step, 10.0 * math.ceil(dur / 60.0 / 10.0))


def route_share_figure(
    runs: ScenarioRuns,
    requests: Mapping[str, pl.DataFrame],
    events: pl.DataFrame,
    llm_colours: Mapping[str, str],
) -> go.Figure:
    """Share of arriving requests routed to each LLM per time bin (stacked to 100%), one
    panel per policy, seeds pooled. Requests that never reached an LLM are left out."""
    pols = runs.policies
    width = _bin_width(runs)
    fig = make_subplots(rows=len(pols), cols=1, shared_xaxes=True, vertical_spacing=0.04,
                        subplot_titles=pols)
    shown: set[str] = set()
    for i, p in enumerate(pols, start=1):
        r = requests[p].filter(pl.col("llm").is_not_null()).with_columns(
            ((pl.col("arrival_s") / width).floor() * width).alias("bin")
        )
        if r.is_empty():
            continue
        counts = r.group_by("bin", "llm").len()
        totals = counts.group_by("bin").agg(pl.col("len").sum().alias("total"))
        counts = counts.join(totals, on="bin").with_columns(
            (100.0 * pl.col("len") / pl.col("total")).alias("pct")
        )
        bins = sorted(counts["bin"].unique().to_list())
        llms = [x for x in llm_colours if x in set(counts["llm"].to_list())]
        for llm in llms:
            s = counts.filter(pl.col("llm") == llm)
            pct = dict(zip(s["bin"].to_list(), s["pct"].to_list(), strict=True))
            fig.add_trace(go.Scatter(
                x=[b + width / 2 for b in bins], y=[pct.get(b, 0.0) for b in bins],
                mode="lines", stackgroup=f"s{i}", name=llm, legendgroup=llm,
                showlegend=llm not in shown, line={"width": 0.5, "color": llm_colours[llm]},
                hovertemplate=f"{llm}<br>t=%{{x:.0f}} s<br>%{{y:.1f}}%<extra>{p}</extra>",
            ), row=i, col=1)
            shown.add(llm)
        fig.update_yaxes(title_text="%", range=[0, 100], row=i, col=1)
    fig.update_xaxes(title_text=f"arrival time, s ({width:g} s bins)", row=len(pols), col=1)
    mark_events(fig, events)  # facets share x; lines span all
    return _layout(fig, "Route share over time (stacked, events dashed)",
                   height=110 + FACET_HEIGHT * len(pols))


def cumulative_cost_figure(
    runs: ScenarioRuns,
    requests: Mapping[str, pl.DataFrame],
    events: pl.DataFrame,
    colours: Mapping[str, str],
) -> go.Figure:
    """Money spent since t = 0 (every billed call, at completion), per policy (first seed),
    with the cost of sending the same queries to the reference LLM."""
    fig = go.Figure()
    ref_drawn = False
    for p in runs.policies:
        seed = runs.first_run(p).seed
        r = requests[p].filter((pl.col("seed") == seed) & pl.col("end_s").is_not_nan())
        r = r.sort("end_s")
        if r.is_empty():
            continue
        t = r["end_s"].to_numpy()
        c = np.cumsum(r["cost_usd"].to_numpy())
        idx = _thin(t.size)
        fig.add_trace(go.Scatter(
            x=t[idx].tolist(), y=c[idx].tolist(), mode="lines", name=p,
            line={"color": colours[p]},
            hovertemplate=f"{p}<br>t=%{{x:.0f}} s<br>$%{{y:.2f}}<extra></extra>",
        ))
        if not ref_drawn:
            ref = requests[p].filter(pl.col("seed") == seed).sort("arrival_s")
            rt = ref["arrival_s"].to_numpy()
            rc = np.cumsum(ref["ref_cost_usd"].fill_nan(0.0).to_numpy())
            ridx = _thin(rt.size)
            ref_name = runs.scenario.workload.reference_llm if runs.scenario else "reference"
            fig.add_trace(go.Scatter(
                x=rt[ridx].tolist(), y=rc[ridx].tolist(), mode="lines",
                name=f"all to {ref_name} (at arrival, no congestion)",
                line={"color": "#999", "dash": "dot"},
            ))
            ref_drawn = True
    mark_events(fig, events)
    fig.update_xaxes(title="time, s")
    fig.update_yaxes(title="cumulative cost, USD")
    return _layout(fig, "Cumulative cost (first seed of each policy, warm-up included)")


def _thin(n: int) -> np.ndarray:
    if n <= MAX_LINE_POINTS:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, MAX_LINE_POINTS).round().astype(int))


# ------------------------------------------------------------------ SLO and saturation
def slo_figure(
    runs: ScenarioRuns, summaries: pl.DataFrame, colours: Mapping[str, str]
) -> go.Figure:
    """SLO attainment and rejected+abandoned share per policy (mean, 95% CI)."""
    from sim.compare import compare

    comp = compare(summaries, metrics=["slo_attainment", "rejected_or_abandoned_share"])
    stat = {(r["policy"], r["metric"]): r for r in comp.iter_rows(named=True)}
    fig = go.Figure()
    for metric, label, opacity in (
        ("slo_attainment", "SLO attainment", 1.0),
        ("rejected_or_abandoned_share", "rejected + abandoned", 0.45),
    ):
        ys, lo, hi = [], [], []
        for p in runs.policies:
            r = stat[(p, metric)]
            m = r["mean"] if r["mean"] is not None else math.nan
            ys.append(100 * m)
            ok = r["ci_low"] is not None and not math.isnan(r["ci_low"])
            lo.append(100 * (m - r["ci_low"]) if ok else 0.0)
            hi.append(100 * (r["ci_high"] - m) if ok else 0.0)
        fig.add_trace(go.Bar(
            x=runs.policies, y=ys, name=label, opacity=opacity,
            marker={"color": [colours[p] for p in runs.policies]},
            error_y={"type": "data", "symmetric": False, "array": hi, "arrayminus": lo},
            # No value (nothing measured in any seed): no label, rather than "nan%".
            text=["" if math.isnan(v) else f"{v:.1f}%" for v in ys], textposition="outside",
            hovertemplate=f"%{{x}}<br>{label} %{{y:.1f}}%<extra></extra>",
        ))
    slo = runs.scenario.slo.p95_wait_s if runs.scenario else None
    title = "SLO attainment (share completed within the wait SLO"
    title += f" of {slo:g} s" if slo is not None else ""
    title += ") and rejected + abandoned share (faded), mean and 95% CI"
    fig.update_layout(barmode="group")
    fig.update_yaxes(title="% of requests after warm-up", range=[0, 112])
    return _layout(fig, title)


def saturation_cells(runs: ScenarioRuns) -> tuple[list[str], dict[tuple[str, str], str]]:
    """LLMs and, per (policy, LLM), the worst label over seeds ('overloaded 2/3' when the
    seeds disagree)."""
    llms: list[str] = []
    cells: dict[tuple[str, str], str] = {}
    for p in runs.policies:
        seen: dict[str, list[str]] = {}
        for run in runs.runs_of(p):
            for llm, label in (run.summary.get("saturation") or {}).items():
                seen.setdefault(llm, []).append(label)
                if llm not in llms:
                    llms.append(llm)
        for llm, labels in seen.items():
            worst = max(labels, key=lambda x: SATURATION_ORDER.index(x)
                        if x in SATURATION_ORDER else -1)
            k = labels.count(worst)
            cells[(p, llm)] = worst if k == len(labels) else f"{worst} {k}/{len(labels)}"
    return llms, cells


def saturation_figure(runs: ScenarioRuns) -> go.Figure:
    """Saturation label per policy and LLM (worst over seeds) as a coloured grid."""
    llms, cells = saturation_cells(runs)
    pols = runs.policies
    z, text = [], []
    for p in pols:
        zr, tr = [], []
        for llm in llms:
            label = cells.get((p, llm), "")
            base = label.split(" ")[0]
            zr.append(SATURATION_ORDER.index(base) if base in SATURATION_ORDER else None)
            tr.append(label or "-")
        z.append(zr)
        text.append(tr)
    cs = SATURATION_COLOURS
    scale = [
        [0.0, cs["stable"]], [1 / 3, cs["stable"]],
        [1 / 3, cs["backlogged"]], [2 / 3, cs["backlogged"]],
        [2 / 3, cs["overloaded"]], [1.0, cs["overloaded"]],
    ]
    fig = go.Figure(go.Heatmap(
        z=z, x=llms, y=pols, text=text, texttemplate="%{text}", zmin=-0.5, zmax=2.5,
        colorscale=scale, showscale=False, xgap=2, ygap=2,
        hovertemplate="%{y} / %{x}: %{text}<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed")
    return _layout(
        fig,
        "Saturation per LLM: stable / backlogged (queue in most samples) / overloaded "
        "(rejections or a growing backlog)",
        height=max(260, 120 + 36 * len(pols)),
    )
