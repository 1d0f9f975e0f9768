"""The `routesim report` and `routesim plan` commands (registered by sim/cli.py).

Bad input prints one line through sim.cli.fail (exit code 2). `plan` exits with code 1 when
no configuration within --max-replicas meets the target (it still writes plan.json and
plan.html with the best configuration found).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from sim.errors import RouteSimError

EXIT_NO_PLAN = 1


def register(app: typer.Typer) -> None:
    app.command("report")(report)
    app.command("plan")(plan)


def report(
    out: Annotated[Path, typer.Argument(help="output directory of `routesim run`")],
    baseline: Annotated[str | None, typer.Option(
        help="policy the summary table's paired differences are taken against")] = None,
) -> None:
    """Write OUT/report.html (self-contained, works offline) from the runs under OUT."""
    from reports.html import write_run_report
    from sim.cli import fail, say

    try:
        path = write_run_report(out, baseline=baseline)
    except RouteSimError as exc:
        fail(exc)
    say(f"report: {path}")


def plan(
    scenario: Annotated[str, typer.Argument(help="scenario YAML or built-in name")],
    policy: Annotated[str, typer.Option("--policy", "-p", help="router to plan for")],
    slo_p95_wait: Annotated[float, typer.Option(
        "--slo-p95-wait", help="target p95 wait before service, seconds")],
    out: Annotated[str, typer.Option(help="directory for plan.json and plan.html")] = "plan",
    max_replicas: Annotated[int, typer.Option(
        help="most replicas per self-hosted LLM")] = 16,
    quality_floor: Annotated[float | None, typer.Option(
        help="least quality, % of the reference LLM's (mean over replications)")] = None,
    seeds: Annotated[int, typer.Option(
        min=1, help="replications per configuration (seed, seed+1, ...)")] = 3,
    max_evaluations: Annotated[int, typer.Option(
        min=1, help="most configurations to simulate")] = 60,
    data: Annotated[str | None, typer.Option(
        help="workload data file (overrides workload.path)")] = None,
) -> None:
    """Cheapest replica counts of the self-hosted LLMs meeting a p95 wait SLO."""
    from reports.capacity import Planner, write_plan
    from sim.cli import _source_of, console, fail, load_for_cli, say
    from sim.record import check_out_dir

    def show(ev) -> None:
        reps = ", ".join(f"{n}={k}" for n, k in zip(planner.llms, ev.config, strict=True))
        mark = "[green]ok[/]" if ev.feasible else "[red]no[/]"
        console.print(
            escape(f"  {ev.stage:>8}  {reps}: ${ev.cost_per_hour:.2f}/h, p95 wait "
                   f"{ev.p95_wait_s:.2f} s, quality {ev.quality_pct:.1f}%  ") + mark,
            highlight=False,
        )

    try:
        check_out_dir(out, field="--out")
        out = Path(out)
        sc = load_for_cli(scenario, data)
        planner = Planner(sc, policy, slo_p95_wait, max_replicas=max_replicas,
                          quality_floor=quality_floor, seeds=seeds,
                          max_evaluations=max_evaluations, on_evaluation=show)
        say(f"planning {', '.join(planner.llms)} of {sc.name} for "
            f"{planner.policy.display}: p95 wait <= {slo_p95_wait:g} s, "
            f"{len(planner.seeds)} replication(s) per configuration")
        result = planner.plan()
        json_path, html_path = write_plan(result, out)
    except RouteSimError as exc:
        fail(exc.with_source(_source_of(scenario)))
    t = Table(title="plan" if result.feasible else "best found (target NOT met)")
    t.add_column("LLM")
    t.add_column("replicas", justify="right")
    t.add_column("utilisation", justify="right")
    t.add_column("late", justify="right")
    for name, n in result.replicas().items():
        d = result.chosen.per_llm[name]
        t.add_row(escape(name + (" (bottleneck)" if name == result.chosen.bottleneck else "")),
                  str(n),
                  f"{100 * d['utilisation']:.0f}%", f"{100 * d['late_share']:.1f}%")
    console.print(t)
    say(result.message)
    say(f"plan: {json_path}  {html_path}  (config: scenario.yaml; the "
        f"{'chosen' if result.feasible else 'best found'} replicas, ready to run: chosen.yaml)")
    if not result.feasible:
        raise typer.Exit(EXIT_NO_PLAN)
