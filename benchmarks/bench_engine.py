"""Engine speed and memory, as ratios against raw SimPy measured in the same run.

Prints:
- raw SimPy M/M/8 customers/s (a process per customer with a Resource; rho = 0.8);
- routesim requests/s on a 4-LLM token-model scenario with feedback and a policy
  (least_loaded by default; `--policy mixllm` for the MixLLM figure), loaded like the
  reference: 150 requests/s keep about 70% of the 448 slots busy (least_loaded spreads it
  evenly; mixllm packs its favourite LLMs to about 90%, where most requests queue and some
  users give up), so queues, dispatch and patience are timed too (`--rate` to change it);
- their ratio (targets: >= 0.5 for least_loaded, >= 0.3 for mixllm): `--repeats` routesim
  runs interleaved with raw SimPy runs, each against the raw runs either side of it, and
  the median of those ratios (a shared machine's speed drifts by +-10% over seconds);
- the peak RSS of a run of `--big` requests (default 1,000,000; target < 1 GiB), measured in
  a fresh subprocess so the rest of the benchmark does not count.

Usage: python benchmarks/bench_engine.py [--n 200000] [--big 1000000] [--policy NAME]
       [--params JSON] [--rate 150] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import simpy

# This checkout's packages, not whichever tree is installed (comparing two checkouts runs
# each one's copy of this script).
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def raw_simpy_mmc(n: int, servers: int = 8, rho: float = 0.8, seed: int = 1) -> float:
    """Customers per second of wall time for the textbook SimPy M/M/c model."""
    rnd = random.Random(seed)
    env = simpy.Environment()
    res = simpy.Resource(env, capacity=servers)
    lam = rho * servers
    waits = []

    def customer(env):
        t0 = env.now
        with res.request() as req:
            yield req
            waits.append(env.now - t0)
            yield env.timeout(rnd.expovariate(1.0))

    def source(env):
        for _ in range(n):
            yield env.timeout(rnd.expovariate(lam))
            env.process(customer(env))

    env.process(source(env))
    t = time.perf_counter()
    env.run()
    return n / (time.perf_counter() - t)


def checked_cli(ap: argparse.ArgumentParser, policy: str, params_json: str,
                positive: dict[str, float] | None = None) -> dict:
    """The policy params of `--params` (JSON), validated against `policy`'s params like a
    scenario's; any bad value (and a non-positive one among `positive`, flag -> value) is
    a usage error (exit 2, no traceback)."""
    from policies import registry
    from sim.errors import RouteSimError

    for flag, value in (positive or {}).items():
        if not value > 0:
            ap.error(f"{flag}: must be > 0, got {value!r}")
    try:
        params = json.loads(params_json)
    except json.JSONDecodeError as exc:
        ap.error(f"--params: not JSON ({exc.msg} at character {exc.pos}): {params_json!r}")
    if not isinstance(params, dict):
        ap.error(f"--params: a JSON object of policy params (e.g. '{{\"online\": true}}'), "
                 f"got {params_json!r}")
    try:
        registry.validate_params(policy, params, field="--policy")
    except RouteSimError as exc:
        where = (exc.field or "").partition(".params")[2].lstrip(".")
        ap.error(f"--params: {where + ': ' if where else ''}{exc.message}" if ".params" in (
            exc.field or "") else str(exc))
    return params


RATE_PER_S = 150.0  # about 70% of the slots busy (least_loaded: 0.70, mixllm: 0.67)


def scenario_for(n: int, policy: str, rate: float = RATE_PER_S):
    """4 LLMs (448 slots) with the token model, feedback on, patience on."""
    from sim.scenario import parse_scenario

    def llm(name, pin, pout, replicas, slots, decode):
        return {"name": name, "price_in_per_mtok": pin, "price_out_per_mtok": pout,
                "replicas": replicas, "slots": slots, "prefill_tps": 8000,
                "decode_tps": decode, "max_queue": 10_000}

    return parse_scenario({
        "name": "bench",
        "seed": 3,
        "duration_s": n / rate,
        "arrivals": {"kind": "poisson", "rate_per_s": rate},
        "workload": {"source": "synthetic", "reference_llm": "gpt-4", "n_queries": 6000},
        "llms": [llm("gpt-4", 10, 30, 4, 16, 60), llm("gpt-3.5-turbo", 1, 2, 4, 32, 120),
                 llm("mixtral-8x7b", 0.6, 0.6, 4, 32, 100),
                 llm("mistral-7b", 0.2, 0.2, 4, 32, 150)],
        "feedback": {"probability": 0.3, "delay_s": {"kind": "exponential", "mean": 30}},
        "users": {"patience_s": {"kind": "exponential", "mean": 120}},
        "run": {"sample_every_s": 10.0, "drain_s": 600.0},
        "policies": [policy],
    })


def routesim_rate(n: int, policy: str, params: dict | None = None,
                  rate: float = RATE_PER_S) -> tuple[float, int, float]:
    """Requests per second of wall time, requests run, and the share of slots busy."""
    import polars as pl

    from policies import registry
    from sim.engine import Simulation, prepare_inputs
    from sim.runner import build_workload

    sc = scenario_for(n, policy, rate)
    wl = build_workload(sc, sc.seed)
    inputs = prepare_inputs(sc, wl, sc.seed)
    pol = registry.create(policy, params or {})
    sim = Simulation(sc, pol, inputs, seed=sc.seed)  # policy setup excluded from the timing
    t = time.perf_counter()
    res = sim.run()
    dt = time.perf_counter() - t
    tl = res.timeline.filter(pl.col("t_s") <= sc.duration_s)
    busy = float(tl["busy"].sum()) / max(float(tl["capacity"].sum()), 1.0)
    return res.requests.height / dt, res.requests.height, busy


def big_run(n: int, policy: str, params: dict | None = None, rate: float = RATE_PER_S) -> None:
    """Child process: one run of n requests; prints JSON with peak RSS."""
    from policies import registry
    from sim.engine import Simulation, prepare_inputs
    from sim.runner import build_workload

    sc = scenario_for(n, policy, rate)
    wl = build_workload(sc, sc.seed)
    inputs = prepare_inputs(sc, wl, sc.seed)
    t = time.perf_counter()
    res = Simulation(sc, registry.create(policy, params or {}), inputs, seed=sc.seed).run()
    dt = time.perf_counter() - t
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"requests": res.requests.height, "wall_s": dt,
                      "peak_rss_mib": peak_kib / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--big", type=int, default=1_000_000)
    ap.add_argument("--policy", default="least_loaded")
    ap.add_argument("--params", default="{}",
                    help='policy params as JSON, e.g. \'{"online": true}\' for mixllm')
    ap.add_argument("--rate", type=float, default=RATE_PER_S,
                    help="arrivals per second of the routesim scenario (load)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="routesim runs, interleaved with repeats + 1 raw SimPy runs")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    params = checked_cli(ap, args.policy, args.params,
                         {"--n": args.n, "--rate": args.rate, "--repeats": args.repeats})
    if args.child:
        big_run(args.big, args.policy, params, args.rate)
        return
    # Interleaved raw, ours, raw, ..., ours, raw: the speed of a shared machine drifts by
    # +-10% over seconds, so each routesim run is compared with the raw runs either side of
    # it, and the median of those ratios is the figure.
    raws = [raw_simpy_mmc(args.n, seed=1)]
    ours_runs, ratios = [], []
    for i in range(args.repeats):
        ours, n, busy = routesim_rate(args.n, args.policy, params, args.rate)
        ours_runs.append(ours)
        raws.append(raw_simpy_mmc(args.n, seed=2 + i))
        ratios.append(ours / ((raws[-2] + raws[-1]) / 2))
    runs = ", ".join(f"{r:,.0f}" for r in raws)
    print(f"raw SimPy M/M/8 (process per customer): {np.median(raws):,.0f} customers/s, "
          f"median of {len(raws)} (runs: {runs})")
    runs = ", ".join(f"{r:,.0f}" for r in ours_runs)
    print(f"routesim {args.policy} {params or ''}, 4 LLMs, token model, feedback: "
          f"{np.median(ours_runs):,.0f} requests/s, median of {len(ours_runs)} (runs: {runs}; "
          f"{n:,} requests at {args.rate:g}/s, {100 * busy:.0f}% of slots busy)")
    target = 0.3 if args.policy == "mixllm" else 0.5
    each = ", ".join(f"{r:.2f}" for r in ratios)
    print(f"ratio routesim / raw SimPy: {np.median(ratios):.2f} (target >= {target}), median "
          f"of each run against the raw runs either side (each: {each})")
    if args.big > 0:
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--big", str(args.big), "--policy",
             args.policy, "--params", args.params, "--rate", str(args.rate)],
            capture_output=True, text=True, check=True,
        )
        info = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{info['requests']:,}-request run: {info['wall_s']:.1f} s, peak RSS "
              f"{info['peak_rss_mib']:.0f} MiB (target < 1024 MiB)")


if __name__ == "__main__":
    main()
