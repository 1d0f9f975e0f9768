"""The sweep report: headline metrics along the axes of a sweep, one self-contained HTML file.

Reads OUT/sweep.parquet and OUT/sweep.json (written by `sim.sweep.run_sweep`). For every
headline metric:

- lines: the metric along each varying axis, one line per policy (mean over seeds and over
  the other axes; error bars are one standard deviation over those cells);
- heatmaps: for each pair of varying axes (at most three pairs), the metric over the pair,
  one panel per policy (mean over seeds and the remaining axes).

Policy-param axes (`policy.<param>`) are axes like any other; when one is plotted, lines
group by the policy without that param. plotly.js is embedded once, so the file opens
offline. Failed and pending cells are listed, not plotted.
"""

from __future__ import annotations

import html
import itertools
import json
from pathlib import Path
from typing import Any

import polars as pl

from sim import sweep as sweep_module
from sim.record import write_text
from sim.sweep import read_sweep

# column -> (title, scale applied for display, unit)
HEADLINE_METRICS: dict[str, tuple[str, float, str]] = {
    "quality_pct_of_reference": ("quality, % of reference", 1.0, "%"),
    "cost_pct_of_reference": ("cost, % of reference", 1.0, "%"),
    "p95_wait_s": ("p95 wait", 1.0, "s"),
    "p95_latency_s": ("p95 latency", 1.0, "s"),
    "slo_attainment": ("SLO attainment", 100.0, "%"),
    "rejected_or_abandoned_share": ("rejected + abandoned", 100.0, "%"),
}
MAX_HEATMAP_PAIRS = 3
REPORT_NAME = "sweep_report.html"


def varying_axes(df: pl.DataFrame, meta: dict[str, Any]) -> list[str]:
    """Axis columns (scenario axes, then policy-param axes) with more than one value."""
    cols = [c for c in [*meta.get("axes", []), *meta.get("policy_axes", [])] if c in df.columns]
    return [c for c in cols if df[c].drop_nulls().n_unique() > 1]


def _series_key(df: pl.DataFrame, axis: str, axes: list[str]) -> pl.Expr:
    """Line label: the policy without the plotted param, plus the other param axes' values."""
    others = [a for a in axes if a.startswith("policy.") and a != axis]
    if not axis.startswith("policy.") and "policy" in df.columns:
        return pl.col("policy")
    parts: list[pl.Expr] = [pl.col("policy_base")]
    for a in others:
        parts.append(pl.when(pl.col(a).is_not_null())
                     .then(pl.lit(f" {a.removeprefix('policy.')}=") + pl.col(a).cast(pl.String))
                     .otherwise(pl.lit("")))
    return pl.concat_str(parts)


def _sorted_values(s: pl.Series) -> list[Any]:
    vals = s.drop_nulls().unique().to_list()
    try:
        return sorted(vals)
    except TypeError:
        return sorted(vals, key=str)


def line_figure(ok: pl.DataFrame, metric: str, axis: str, axes: list[str]):
    import plotly.graph_objects as go

    title, scale, unit = HEADLINE_METRICS[metric]
    d = ok.with_columns(_series_key(ok, axis, axes).alias("_series"))
    agg = (
        d.filter(pl.col(axis).is_not_null())
        .group_by("_series", axis)
        .agg((pl.col(metric) * scale).mean().alias("mean"),
             (pl.col(metric) * scale).std().alias("sd"), pl.len().alias("n"))
        .sort("_series", axis)
    )
    # Integer axes (replicas, slots) are categories: a continuous axis would tick 1.2, 1.4.
    numeric = agg[axis].dtype.is_float()
    fig = go.Figure()
    for (series,), g in agg.group_by("_series", maintain_order=True):
        x = g[axis].to_list() if numeric else [str(v) for v in g[axis].to_list()]
        fig.add_trace(go.Scatter(
            x=x, y=g["mean"].to_list(), name=str(series), mode="lines+markers",
            error_y={"type": "data", "array": g["sd"].fill_null(0.0).to_list(),
                     "visible": True},
            customdata=g["n"].to_list(),
            hovertemplate=f"{axis}=%{{x}}<br>{title}=%{{y:.3g}} {unit}"
                          "<br>cells=%{customdata}<extra>%{fullData.name}</extra>",
        ))
    fig.update_layout(
        title=f"{title} along {axis}", xaxis_title=axis, yaxis_title=f"{title} ({unit})",
        height=380, margin={"t": 50, "b": 40, "l": 60, "r": 20}, legend_title="policy",
        showlegend=True,
    )
    if not numeric:
        fig.update_xaxes(type="category")
    return fig


def heatmap_figure(ok: pl.DataFrame, metric: str, ax_x: str, ax_y: str, axes: list[str]):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    title, scale, unit = HEADLINE_METRICS[metric]
    series_axis = ax_x if ax_x.startswith("policy.") else ax_y
    d = ok.with_columns(_series_key(ok, series_axis, [a for a in axes if a != ax_x
                                                       and a != ax_y] + [series_axis])
                        .alias("_series"))
    d = d.filter(pl.col(ax_x).is_not_null() & pl.col(ax_y).is_not_null())
    agg = d.group_by("_series", ax_x, ax_y).agg((pl.col(metric) * scale).mean().alias("v"))
    series = _sorted_values(agg["_series"])
    xs, ys = _sorted_values(agg[ax_x]), _sorted_values(agg[ax_y])
    if not series or not xs or not ys:
        return None
    ncols = min(len(series), 3)
    nrows = -(-len(series) // ncols)
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=[str(s) for s in series],
                        horizontal_spacing=0.08, vertical_spacing=0.18)
    lo, hi = agg["v"].min(), agg["v"].max()
    lookup = {(r["_series"], r[ax_x], r[ax_y]): r["v"] for r in agg.iter_rows(named=True)}
    for i, s in enumerate(series):
        z = [[lookup.get((s, x, y)) for x in xs] for y in ys]
        fig.add_trace(
            go.Heatmap(
                z=z, x=[str(x) for x in xs], y=[str(y) for y in ys], zmin=lo, zmax=hi,
                colorscale="Viridis", showscale=i == 0, colorbar={"title": unit},
                texttemplate="%{z:.3g}",
                hovertemplate=f"{ax_x}=%{{x}}<br>{ax_y}=%{{y}}<br>{title}=%{{z:.3g}} {unit}"
                              f"<extra>{html.escape(str(s))}</extra>",
            ),
            row=i // ncols + 1, col=i % ncols + 1,
        )
    fig.update_xaxes(type="category", title_text=ax_x)
    fig.update_yaxes(type="category", title_text=ax_y)
    fig.update_layout(title=f"{title}: {ax_y} x {ax_x}", height=320 * nrows + 80,
                      margin={"t": 80, "b": 40, "l": 60, "r": 20})
    return fig


def _table(df: pl.DataFrame, cols: list[str], limit: int = 50) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in df.select(cols).head(limit).iter_rows():
        body.append("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in r) + "</tr>")
    more = f"<p>... and {df.height - limit} more</p>" if df.height > limit else ""
    return f"<table><tr>{head}</tr>{''.join(body)}</table>{more}"


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def sweep_report_html(out: str | Path) -> str:
    """The report of the sweep in `out` as one HTML string (plotly.js embedded once)."""
    df, meta = read_sweep(out)
    name = meta.get("name", Path(out).name)
    ok = df.filter(pl.col("status") == "ok") if "status" in df.columns else df
    if "upper_bound" in ok.columns and "policy" in ok.columns:
        # Ground-truth runs (the oracle, fan-outs keeping the best realised answer) are
        # labelled as in every other report.
        flag = pl.col("upper_bound").fill_null(False)
        ok = ok.with_columns(
            pl.when(flag).then(pl.col(c) + " (upper bound)").otherwise(pl.col(c)).alias(c)
            for c in ("policy", "policy_base") if c in ok.columns
        )
    axes = varying_axes(df, meta)
    counts = df.group_by("status").len().sort("status").iter_rows()
    status = ", ".join(f"{n} {s}" for s, n in counts)
    parts = [
        f"<h1>Sweep {html.escape(name)}</h1>",
        f"<p>base scenario <code>{html.escape(str(meta.get('base', '?')))}</code>; "
        f"{df.height} cells ({html.escape(status)}); policies: "
        f"{html.escape(', '.join(meta.get('policies', [])))}; seeds: "
        f"{html.escape(json.dumps(meta.get('seeds', [])))}.</p>",
    ]
    all_axes = [*meta.get("axes", []), *meta.get("policy_axes", [])]
    if all_axes:
        rows = "".join(
            f"<tr><td><code>{html.escape(a)}</code></td><td>"
            f"{html.escape(', '.join(_cell(v) for v in _sorted_values(df[a])))}</td></tr>"
            for a in all_axes if a in df.columns
        )
        parts.append(f"<h2>Axes</h2><table><tr><th>axis</th><th>values</th></tr>{rows}</table>")
    bad = df.filter(pl.col("status") != "ok") if "status" in df.columns else df.clear()
    if bad.height:
        parts.append("<h2>Cells without results</h2><p>Failed cells keep their traceback in "
                     "<code>cells/&lt;cell-id&gt;/error.json</code>; pending cells did not "
                     "finish (rerun the sweep to resume).</p>")
        parts.append(_table(bad, ["cell_id", "status", *[a for a in all_axes if a in
                                                          bad.columns], "policy", "seed",
                                   "error"]))
    metrics = [m for m in HEADLINE_METRICS if m in ok.columns]
    figs = []
    if ok.height and metrics:
        if not axes:
            parts.append("<p>No axis varies: the table below is the whole sweep.</p>")
        else:
            parts.append("<p>Lines: mean over seeds and the other axes, bars one standard "
                         "deviation over those cells. Heatmaps: mean over seeds and the "
                         "remaining axes, one panel per policy.</p>")
        for m in metrics:
            sect = [f"<h2>{html.escape(HEADLINE_METRICS[m][0])}</h2>"]
            for a in axes:
                figs.append(line_figure(ok, m, a, axes))
                sect.append(f"@@FIG{len(figs) - 1}@@")
            for ax_x, ax_y in list(itertools.combinations(axes, 2))[:MAX_HEATMAP_PAIRS]:
                fig = heatmap_figure(ok, m, ax_x, ax_y, axes)
                if fig is not None:
                    figs.append(fig)
                    sect.append(f"@@FIG{len(figs) - 1}@@")
            parts.extend(sect)
        summary_cols = [c for c in ["policy", *axes, "seed", *metrics] if c in ok.columns]
        parts.append("<h2>All cells</h2>")
        parts.append(_table(ok.sort("index"), summary_cols, limit=500))
    body = "\n".join(parts)
    for i, fig in enumerate(figs):
        # A fixed div id: plotly's default is a random UUID, so the same sweep would give a
        # different file every time.
        div = fig.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=f"fig{i}",
                          config={"displaylogo": False})
        body = body.replace(f"@@FIG{i}@@", f"<div class='fig'>{div}</div>", 1)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>sweep {html.escape(name)}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px}"
        "table{border-collapse:collapse;font-size:13px;margin:8px 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        ".fig{margin:8px 0 24px}</style></head><body>"
        f"{body}</body></html>"
    )


def write_sweep_report(out: str | Path, path: str | Path | None = None) -> Path:
    """Write OUT/sweep_report.html (or `path`); returns where it went."""
    target = Path(path) if path is not None else Path(out) / REPORT_NAME
    write_text(sweep_report_html(out), target)
    return target


def register(app) -> None:
    """Add `routesim sweep-report OUT` and write the report after every `routesim sweep`."""
    import typer

    hooks = sweep_module.AFTER_SWEEP_HOOKS
    if write_sweep_report not in hooks:
        hooks.append(write_sweep_report)

    @app.command("sweep-report")
    def sweep_report(
        out: Path = typer.Argument(..., help="a sweep's output directory"),
    ) -> None:
        """Write OUT/sweep_report.html from OUT/sweep.parquet."""
        from sim.cli import fail, say
        from sim.errors import RouteSimError

        try:
            path = write_sweep_report(out)
        except RouteSimError as exc:
            fail(exc)
        say(f"report: {path}")


def main(argv: list[str] | None = None) -> None:  # pragma: no cover
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m reports.sweep_report OUT")
    print(write_sweep_report(args[0]))


if __name__ == "__main__":  # pragma: no cover
    main()
