"""`routesim frontier`: quality-cost frontiers and AIQ of the routers, uncongested.

One command gives the table (terminal) and the figure data: OUT/frontier_points.parquet
(every evaluated point), OUT/frontier_aiq.parquet (AIQ and default point per policy) and
OUT/frontier.html (the frontier figure, offline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import plotly.graph_objects as go
import polars as pl
import typer
from rich.markup import escape
from rich.table import Table

from reports.figures import cost_axis
from sim.errors import RouteSimError

DEFAULT_SCENARIO = "routerbench_steady"


def _routers() -> list[str]:
    from policies import registry
    from reports.frontier import LEARNED_ROUTERS

    names = registry.names()
    return [p for p in (*LEARNED_ROUTERS, "mixllm") if p in names]


def frontier_figure(points: pl.DataFrame, title: str) -> go.Figure:
    fig = go.Figure()
    singles = points.filter(pl.col("kind") == "llm")
    fig.add_trace(go.Scatter(
        x=singles["cost_pct"].to_list(), y=singles["quality_pct"].to_list(), mode="markers+text",
        text=singles["policy"].to_list(), textposition="top center", name="single LLMs",
        marker={"symbol": "diamond", "size": 9, "color": "#555"},
    ))
    for name in points.filter(pl.col("kind") != "llm")["policy"].unique(maintain_order=True):
        sub = points.filter(pl.col("policy") == name).sort("cost_pct")
        mode = "lines+markers" if sub.height > 1 else "markers"
        fig.add_trace(go.Scatter(
            x=sub["cost_pct"].to_list(), y=sub["quality_pct"].to_list(), mode=mode, name=name,
            text=[f"{r['knob']}={r['knob_value']}" if r["knob"] else name
                  for r in sub.iter_rows(named=True)],
        ))
    fig.update_layout(title=title, yaxis_title="quality, % of reference LLM",
                      template="plotly_white", height=600)
    fig.update_xaxes(**cost_axis(points["cost_pct"].to_list(), "cost, % of reference LLM"))
    return fig


def aiq_rich_table(summary: pl.DataFrame, title: str) -> Table:
    t = Table(title=title)
    for col in ("policy", "AIQ", "default quality %", "default cost %", "quality at random's "
                "cost", "beats random"):
        t.add_column(col, justify="left" if col == "policy" else "right")

    def f(v, spec=".2f"):
        return "-" if v is None else f"{v:{spec}}"

    for r in summary.iter_rows(named=True):
        br = r["beats_random"]
        t.add_row(
            escape(r["policy"]
                   + (" (upper bound)" if r["kind"] in ("oracle", "upper_bound") else "")),
            f(r["aiq_pct"]), f(r["default_quality_pct"]), f(r["default_cost_pct"]),
            f(r["quality_at_random_cost_pct"]), "-" if br is None else ("yes" if br else "no"),
        )
    return t


def register(app: typer.Typer) -> None:
    @app.command()
    def frontier(
        scenario: Annotated[str, typer.Argument(
            help="scenario whose workload and LLMs to use")] = DEFAULT_SCENARIO,
        data: Annotated[str | None, typer.Option(
            help="workload data file (overrides workload.path)")] = None,
        policy: Annotated[list[str] | None, typer.Option(
            "--policy", "-p", help="router to sweep (repeat); default: every learned one")]
            = None,
        out: Annotated[str, typer.Option(help="output directory")] = "frontier",
        seed: Annotated[int | None, typer.Option(
            min=0, help="seed (default: the scenario's)")] = None,
    ) -> None:
        """Sweep each router's trade-off knob on the test split (uncongested): frontier + AIQ."""
        from policies import registry
        from reports.frontier import frontier_table
        from sim.cli import _source_of, console, fail, load_for_cli, say
        from sim.context import llm_info
        from sim.record import check_out_dir, write_parquet, write_text
        from sim.runner import build_workload
        from sim.scenario import dump_scenario

        try:
            check_out_dir(out, field="--out")
            out = Path(out)
            sc = load_for_cli(scenario, data)
            names = policy or _routers()
            for i, n in enumerate(names):
                registry.get(n, field=f"--policy.{i}")
            s = sc.seed if seed is None else seed
            with console.status(f"loading workload of {sc.name}"):
                wl = build_workload(sc, s)
            llms = [llm_info(x, wl, field=f"llms.{i}") for i, x in enumerate(sc.llms)]
            ref_name = sc.workload.reference_llm
            if ref_name not in {x.name for x in llms}:
                # It joins later (an add_llm event); the % units need it as a point.
                llms.append(llm_info(sc.llm(ref_name), wl, field="workload.reference_llm"))
            ref = next(x for x in llms if x.name == ref_name)
            with console.status(escape(f"sweeping {', '.join(names)}")):
                res = frontier_table(wl, llms, ref, names, seed=s, judge=sc.judge)
        except RouteSimError as exc:
            fail(exc.with_source(_source_of(scenario)))
        console.print(aiq_rich_table(res.summary, escape(f"{sc.name}: AIQ on the test split "
                                                         f"(reference {ref.name})")))
        # The resolved config (data file, seed and the routers swept) beside the outputs.
        swept = sc.model_copy(update={"seed": s, "policies": list(names)})
        write_text(dump_scenario(swept), out / "scenario.yaml")
        write_parquet(res.points, out / "frontier_points.parquet")
        write_parquet(res.summary, out / "frontier_aiq.parquet")
        from reports.page import Page

        page = Page(f"{sc.name}: quality-cost frontier")
        page.heading(f"{sc.name}: quality-cost frontier (test split, uncongested)", 1)
        page.figure(frontier_figure(res.points, "quality vs cost, % of the reference LLM"))
        page.table(list(res.summary.columns), [list(r) for r in res.summary.iter_rows()])
        write_text(page.render(), out / "frontier.html")
        say(f"outputs: {out}/frontier_points.parquet, frontier_aiq.parquet, frontier.html, "
            "scenario.yaml")
