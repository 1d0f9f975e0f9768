"""routesim's engine: scenarios, workloads, arrivals, cluster, users, recording, metrics.

`sim.run(...)` runs a scenario for several policies and seeds and returns polars frames
(see `sim.runner.run`).
"""

from __future__ import annotations

from typing import Any


def run(*args: Any, **kwargs: Any):
    """Shortcut for `sim.runner.run` (imported lazily to keep `import sim` light)."""
    from sim.runner import run as _run

    return _run(*args, **kwargs)
