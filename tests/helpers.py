"""Small scenario builders shared by the tests."""

from __future__ import annotations

from typing import Any

from sim.scenario import Scenario, parse_scenario


def llm(name: str = "gpt-4", **kw: Any) -> dict[str, Any]:
    base = {"name": name, "price_in_per_mtok": 10.0, "price_out_per_mtok": 30.0}
    base.update(kw)
    return base


def scenario(**kw: Any) -> Scenario:
    """A small valid scenario; keyword arguments replace top-level keys."""
    data: dict[str, Any] = {
        "name": "t",
        "seed": 1,
        "duration_s": 200.0,
        "arrivals": {"kind": "poisson", "rate_per_s": 2.0},
        "llms": [llm("gpt-4"), llm("mistral-7b", price_in_per_mtok=0.2, price_out_per_mtok=0.2)],
        "workload": {"source": "synthetic", "reference_llm": "gpt-4", "n_queries": 500},
        "policies": ["random"],
    }
    data.update(kw)
    return parse_scenario(data)
