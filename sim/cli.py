"""The `routesim` command (composition root): run, validate, list.

Bad input (any RouteSimError) prints one clear line naming the file, the field and the rule,
and exits with code 2, without a traceback and without creating an output directory.
"""

from __future__ import annotations

import re
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sim.errors import RouteSimError
from sim.scenario import (
    DEFAULT_SCENARIO,
    Scenario,
    builtin_scenarios,
    check_input_files,
    load_scenario,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help="Discrete-event simulator of routed LLM clusters.",
    pretty_exceptions_enable=False,
)
# Piped output (CI logs, files) gets a wide table instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)


def say(text: str) -> None:
    """Print plain text (paths and labels are not rich markup: "runs[1]" keeps "[1]")."""
    console.print(text, markup=False, highlight=False)

EXIT_BAD_INPUT = 2


def fail(exc: BaseException) -> None:
    # The message is plain text: "routesim[ray]" or a policy named "x[bold]" must print as is.
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True,
                      soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)


@contextmanager
def terminate_as_exit():
    """SIGTERM (a `timeout`, a CI cancel, a batch scheduler) unwinds like Ctrl-C, so the
    runner removes its staged outputs; Python's default would end the process on the spot."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def load_for_cli(scenario: str | None, data: str | None = None) -> Scenario:
    """The scenario with `--data` applied; every file it reads checked to exist."""
    sc = load_scenario(scenario or DEFAULT_SCENARIO)
    if data is not None:
        if sc.workload.source == "synthetic":
            raise RouteSimError(
                f"scenario {sc.name!r} has a synthetic workload (workload.source); --data "
                "replaces the data file of a 'routerbench' workload",
                field="--data",
            )
        if not Path(data).is_file():
            raise RouteSimError(
                "is a directory; give the data file itself (CSV or parquet)"
                if Path(data).is_dir() else "no such file", source=data, field="--data")
        wl = sc.workload.model_copy(update={"path": str(Path(data).resolve())})
        sc = sc.model_copy(update={"workload": wl})
    check_input_files(sc)
    return sc


def _source_of(scenario: str | None) -> str:
    """The file a scenario argument names (built-in names resolve to the shipped file)."""
    from sim.scenario import builtin_scenario_path

    name = scenario or DEFAULT_SCENARIO
    if Path(name).is_file():
        return name
    path = builtin_scenario_path(name)
    return str(path) if path else name


@app.command()
def run(
    scenario: Annotated[str | None, typer.Argument(
        help="scenario YAML or built-in name (default: the built-in load spike)")] = None,
    policy: Annotated[list[str] | None, typer.Option(
        "--policy", "-p", help="policy name or a label of the scenario's list (its params "
        "come along); repeat for several; default: the scenario's list")] = None,
    seeds: Annotated[int, typer.Option(min=1, help="replications (seed, seed+1, ...)")] = 1,
    # str, not Path: typer would turn --out "" into Path("."), the working directory.
    out: Annotated[str, typer.Option(help="output directory")] = "runs",
    data: Annotated[str | None, typer.Option(
        help="workload data file (overrides workload.path)")] = None,
    report: Annotated[bool, typer.Option(help="write OUT/report.html")] = True,
    baseline: Annotated[str | None, typer.Option(
        help="policy the others are compared with, paired by seed (default: the first)")]
        = None,
) -> None:
    """Simulate every (policy, seed) of a scenario and compare them."""
    from sim.compare import compare, compare_tables, upper_bound_policies
    from sim.record import check_out_dir
    from sim.runner import baseline_label, check_models, resolve_policies
    from sim.runner import run as run_all

    try:
        check_out_dir(out, field="--out")
        out = Path(out)
        sc = load_for_cli(scenario, data)
        specs = resolve_policies(sc, policy)
        check_models(sc)
        labels = [s.display for s in specs]
        baseline = baseline_label(sc, baseline, labels, field="--baseline")
    except RouteSimError as exc:
        fail(exc.with_source(_source_of(scenario)))
    total = len(specs) * seeds
    horizon = sc.duration_s + (sc.run.drain_s or 0.0)
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed:.1f}"
        "/{task.total:.0f} runs"), TimeElapsedColumn(), console=console, transient=False,
    ) as prog:
        task = prog.add_task(f"{sc.name}", total=total)
        done = {"n": 0}

        def on_progress(label: str, t: float) -> None:
            frac = min(t / horizon, 1.0) if horizon > 0 else 1.0
            prog.update(task, completed=done["n"] + frac, description=escape(f"{sc.name}: {label}"))

        def on_done(_summary: dict) -> None:
            done["n"] += 1
            prog.update(task, completed=done["n"])

        try:
            # `policy`, not `specs`: errors then name the entry as written (policies.1, or
            # --policy).
            with terminate_as_exit():
                res = run_all(sc, policy, seeds, out, keep_requests=False,
                              on_progress=on_progress, on_run_done=on_done,
                              baseline=baseline or labels[0])
        except RouteSimError as exc:
            prog.stop()
            fail(exc.with_source(_source_of(scenario)))
    comparison = compare(res.summaries, baseline or labels[0])
    title = (f"{sc.name}: mean ± 95% CI over {seeds} seed(s), "
             f"SLO p95 wait <= {sc.slo.p95_wait_s}s")
    for table in compare_tables(comparison, title=title,
                                upper_bound=upper_bound_policies(res.summary)):
        console.print(table)
    if report:
        try:
            from reports.html import write_run_report
        except ImportError:
            write_run_report = None
        if write_run_report is not None:
            try:
                path = write_run_report(out)
            except RouteSimError as exc:
                fail(exc)
            say(f"report: {path}")
    say(f"outputs: {out}/ (summary.parquet, {sc.name}/<policy>/seed<k>/)")


@app.command()
def validate(
    file: Annotated[str, typer.Argument(help="scenario YAML")],
    data: Annotated[str | None, typer.Option(
        help="workload data file (overrides workload.path)")] = None,
) -> None:
    """Check a scenario file (fields, policies, the files it reads) without running it."""
    from sim.runner import check_models, resolve_policies

    try:
        sc = load_for_cli(file, data)
        specs = resolve_policies(sc)
        check_models(sc)
        if sc.arrivals.kind == "trace":  # its timestamps must fall in the run
            from sim.arrivals import trace_times

            trace_times(sc.arrivals, sc.duration_s)
        if sc.workload.source == "routerbench" and sc.workload.path:  # as a run checks it
            from sim.routerbench import check_mix_families, check_table

            check_table(Path(sc.workload.path),
                        [s.model_name for s in sc.all_llms()])
            mixes = [("workload.mix", list(sc.workload.mix or {}))]
            mixes += [(f"events.{i}.mix_change.mix", list(e.mix_change.mix))
                      for i, e in enumerate(sc.events) if e.mix_change is not None]
            check_mix_families(Path(sc.workload.path), [m for m in mixes if m[1]])
    except RouteSimError as exc:
        fail(exc.with_source(_source_of(file)))
    console.print(
        "[green]ok[/]: " + escape(
            f"{file}: scenario {sc.name!r}, {len(sc.llms)} LLM(s), {len(sc.events)} "
            f"event(s), policies: {', '.join(s.display for s in specs)}"),
        highlight=False,
    )


@app.command("list")
def list_things() -> None:
    """Registered policies and built-in scenarios."""
    from policies import registry

    t = Table(title="policies")
    t.add_column("name")
    t.add_column("params")
    t.add_column("note")
    for name in registry.names():
        cls = registry.get(name)
        params = ", ".join(cls.Params.model_fields) or "-"
        # The docstring's first paragraph: its first line alone can stop mid-sentence.
        note = cls.label or " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        t.add_row(escape(name), params, escape(note))
    console.print(t)
    s = Table(title="built-in scenarios")
    s.add_column("name")
    s.add_column("what it shows")
    from sim.scenario import builtin_scenario_path

    for name in builtin_scenarios():
        path = builtin_scenario_path(name)
        first = ""
        if path is not None:
            lines = [ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#")]
            text = " ".join(lines)
            # The first sentence ("et al.", "e.g.", "i.e." and "vs." do not end one).
            first = re.split(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)(?<!\bvs)\.\s+", text,
                             maxsplit=1)[0]
            first = first.rstrip(".") + "."
            if len(first) > 140:  # cut at a word, and say so
                first = first[:140].rsplit(" ", 1)[0] + " ..."
        s.add_row(name, escape(first))
    console.print(s)


def _register_plugins() -> None:
    """Subcommands that live next to the code they drive (reports, sweeps, frontiers)."""
    import importlib

    for mod in ("reports.commands", "sim.sweep", "reports.sweep_report", "reports.frontier_cli"):
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
            continue
        module.register(app)


_register_plugins()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
