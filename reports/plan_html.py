"""`plan.html`: the capacity plan, the configurations tried, cost vs p95 wait, and which LLM
is the bottleneck (self-contained, offline; see reports.page)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import plotly.graph_objects as go

from reports.page import Page

if TYPE_CHECKING:
    from reports.capacity import Evaluation, Plan


def _num(v: float | None, spec: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "∞" if v == math.inf else "-"
    return f"{v:{spec}}"


def plan_page(plan: Plan) -> Page:
    p = plan.planner
    ev = plan.chosen
    page = Page(f"routesim capacity plan: {p.scenario.name} with {p.policy.display}")
    floor = f", quality ≥ {p.quality_floor:g}% of the reference" if p.quality_floor else ""
    page.note(
        f"Target: p95 wait ≤ {p.slo:g} s{floor}; at most {p.max_replicas} replicas per LLM; "
        f"{len(p.seeds)} replication(s) per configuration (seeds "
        f"{', '.join(map(str, p.seeds))}, the same for every configuration). Cost per hour = "
        "replica-hours of the self-hosted LLMs + per-token spend per measured hour."
    )
    page.heading("Verdict", 2)
    verdict = ("Plan found" if plan.feasible else "No configuration meets the target") + ": "
    page.raw(f"<p><b>{verdict}</b>{_esc(plan.message)}</p>")
    if plan.upper_bound:
        page.note(f"Upper bound: {plan.upper_bound_reason}. Its route shares and quality are "
                  "out of a deployable router's reach, so size a real cluster with a router "
                  "that does not see ground truth.")
    if plan.feasible and plan.minimal:
        page.note("Locally cheapest: no single replica removed, moved or added gives a "
                  "configuration that meets the target at a lower cost per hour (checked by "
                  "simulation; the removals below).")

    page.heading("The plan", 2)
    bottleneck = ev.bottleneck
    rows, classes = [], []
    for name in p.llms:
        d = ev.per_llm[name]
        spec = p.specs[name]
        rows.append([
            name + (" (bottleneck)" if name == bottleneck else ""),
            int(d["replicas"]),
            f"{spec.replica_cost_per_hour:.2f}",
            f"{d['replicas'] * spec.replica_cost_per_hour:.2f}",
            f"{100 * d['route_share']:.1f}%",
            f"{100 * d['utilisation']:.1f}%",
            _num(d["p95_wait_s"]),
            f"{100 * d['late_share']:.2f}%",
        ])
        classes.append("chosen" if name == bottleneck else "")
    page.table(["LLM", "replicas", "$/h per replica", "$/h", "route share", "utilisation",
                "p95 wait s", "late (> SLO or rejected)"], rows, row_classes=classes)
    lo, hi = ev.p95_ci
    page.table(
        ["total $/h", "replica $/h", "per-token spend $/h", "p95 wait s (mean)", "95% CI",
         "quality % of reference", "meets SLO", "meets quality floor"],
        [[f"{ev.cost_per_hour:.2f}", f"{ev.replica_cost_per_hour:.2f}",
          f"{ev.api_cost_per_hour:.2f}", _num(ev.p95_wait_s),
          f"[{_num(lo)}, {_num(hi)}]" if not math.isnan(lo) else "-",
          f"{ev.quality_pct:.1f}", "yes" if ev.meets_slo else "no",
          "yes" if ev.meets_quality else "no"]],
        cell_classes=[["", "", "", "", "", "", "ok" if ev.meets_slo else "fail",
                       "ok" if ev.meets_quality else "fail"]],
    )

    checks = plan.removal_checks()
    if checks:
        page.heading("One replica fewer", 2)
        page.figure(_removal_figure(plan, checks))

    page.heading("Configurations tried", 2)
    page.figure(_tried_figure(plan))
    page.figure(_bottleneck_figure(plan))
    order = sorted(plan.tried, key=lambda e: (e.cost_per_hour, e.p95_wait_s))
    page.table(
        ["stage"] + p.llms + ["$/h", "p95 wait s", "quality %", "feasible", "bottleneck"],
        [[e.stage, *e.config, f"{e.cost_per_hour:.2f}", _num(e.p95_wait_s),
          f"{e.quality_pct:.1f}", "yes" if e.feasible else "no", e.bottleneck or "-"]
         for e in order],
        row_classes=["chosen" if e is ev else "" for e in order],
        cell_classes=[[""] * (len(p.llms) + 4) + ["ok" if e.feasible else "fail", ""]
                      for e in order],
    )

    page.heading("Analytic start (Erlang C per LLM)", 2)
    page.note("From a pilot run with every self-hosted LLM at the maximum: the router's route "
              "share and arrival rate per LLM in 60 s windows, and the mean service time on a "
              "full replica. Replicas: fewest for which an M/M/c queue per window keeps at most "
              "5% of requests waiting longer than the SLO.")
    page.table(
        ["LLM", "pilot route share", "mean rate /s", "peak rate /s", "service s (full batch)",
         "slots per replica", "Erlang C replicas"],
        [[name, f"{100 * a['route_share_pilot']:.1f}%", f"{a['mean_rate_per_s']:.2f}",
          f"{a['peak_rate_per_s']:.2f}", f"{a['mean_service_full_batch_s']:.2f}",
          a["servers_per_replica"],
          a["replicas"] if a["replicas"] is not None else f"> {p.max_replicas}"]
         for name, a in plan.analytic.items()],
    )
    return page


def _esc(text: str) -> str:
    from reports.page import esc

    return esc(text)


def _label(plan: Plan, e: Evaluation) -> str:
    return ", ".join(f"{n}={k}" for n, k in zip(plan.planner.llms, e.config, strict=True))


def _clipped(values: list[float], cap: float) -> tuple[list[float], list[str]]:
    """Values drawn at most at `cap` (so long waits do not flatten the interesting range),
    and marker symbols flagging the clipped ones."""
    ys = [min(v, cap) for v in values]
    return ys, ["triangle-up" if v > cap else "circle" for v in values]


def _tried_figure(plan: Plan) -> go.Figure:
    p = plan.planner
    cap = 5 * p.slo
    fig = go.Figure()
    for ok, name, colour in ((True, "feasible", "#2ca02c"), (False, "infeasible", "#d62728")):
        es = [e for e in plan.tried if e.feasible == ok]
        if not es:
            continue
        ys, symbols = _clipped([e.p95_wait_s for e in es], cap)
        fig.add_trace(go.Scatter(
            x=[e.cost_per_hour for e in es], y=ys, mode="markers", name=name,
            text=[f"{_label(plan, e)}<br>p95 wait {_num(e.p95_wait_s)} s" for e in es],
            marker={"color": colour, "size": 9, "opacity": 0.75, "symbol": symbols},
            hovertemplate="%{text}<br>$%{x:.2f}/h<extra></extra>",
        ))
    c = plan.chosen
    fig.add_trace(go.Scatter(
        x=[c.cost_per_hour], y=_clipped([c.p95_wait_s], cap)[0],
        mode="markers", name="plan" if plan.feasible else "best found",
        marker={"symbol": "star", "size": 18, "color": "#1f77b4",
                "line": {"width": 1, "color": "#000"}},
        text=[f"{_label(plan, c)}<br>p95 wait {_num(c.p95_wait_s)} s"],
        hovertemplate="%{text}<br>$%{x:.2f}/h<extra></extra>",
    ))
    fig.add_hline(y=p.slo, line={"dash": "dash", "color": "#c00"},
                  annotation_text=f"SLO {p.slo:g} s")
    fig.update_xaxes(title="cost, $ per hour")
    fig.update_yaxes(title=f"p95 wait, s (mean over replications; ▲ = above {cap:g} s)",
                     range=[0, cap * 1.08])
    fig.update_layout(title={"text": "Cost vs p95 wait of every configuration simulated",
                             "x": 0}, template="plotly_white", height=450)
    return fig


def _bottleneck_figure(plan: Plan) -> go.Figure:
    """Per LLM of the chosen configuration: utilisation and share of late requests."""
    p = plan.planner
    d = plan.chosen.per_llm
    fig = go.Figure()
    fig.add_trace(go.Bar(x=p.llms, y=[100 * d[n]["utilisation"] for n in p.llms],
                         name="utilisation %"))
    fig.add_trace(go.Bar(x=p.llms, y=[100 * d[n]["late_share"] for n in p.llms],
                         name="late requests %"))
    fig.update_layout(
        title={"text": f"Per LLM in the {'plan' if plan.feasible else 'best configuration'} "
               f"(bottleneck: {plan.chosen.bottleneck})", "x": 0},
        barmode="group", template="plotly_white", height=380,
    )
    fig.update_yaxes(title="%")
    return fig


def _removal_figure(plan: Plan, checks: dict[str, Evaluation]) -> go.Figure:
    p = plan.planner
    names = list(checks)
    ys = [checks[n].p95_wait_s for n in names]
    cap = 5 * p.slo
    fig = go.Figure(go.Bar(
        x=[f"{n} {int(plan.chosen.per_llm[n]['replicas'])}→"
           f"{int(plan.chosen.per_llm[n]['replicas']) - 1}" for n in names],
        y=_clipped(ys, cap)[0],
        marker={"color": ["#d62728" if not checks[n].feasible else "#ff7f0e" for n in names]},
        text=[f"{_num(y)} s, ${checks[n].cost_per_hour:.2f}/h" for n, y in zip(names, ys,
                                                                         strict=True)],
        textposition="outside",
    ))
    fig.add_hline(y=p.slo, line={"dash": "dash", "color": "#c00"},
                  annotation_text=f"SLO {p.slo:g} s")
    fig.update_layout(
        title={"text": "p95 wait with one replica fewer (red: target broken; orange: target "
                       f"met but dearer than the plan's ${plan.chosen.cost_per_hour:.2f}/h)",
               "x": 0},
        template="plotly_white", height=380,
    )
    fig.update_yaxes(title=f"p95 wait, s (bars capped at {cap:g} s; labels exact)",
                     range=[0, cap * 1.15])
    return fig
