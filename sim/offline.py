"""Uncongested ("offline") evaluation: route every query of a split with an idle cluster.

This is how routing papers (RouterBench, MixLLM) score routers: no queues, every answer
arrives. It calls the same `Policy.route` / `on_answer` / `feedback` as the simulator, with a
`ClusterView` of idle deployments, so a policy cannot behave differently here. Quality and
cost are reported as % of sending every query to the reference LLM (sim.metrics's definitions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sim.context import request_cost_usd
from sim.errors import RouteSimError
from sim.scenario import JudgeSpec
from sim.types import Answer, ClusterView, Decision, Feedback, LLMInfo, Query, Workload


def idle_view(llms: Sequence[LLMInfo], mean_service_s: float = 1.0) -> ClusterView:
    """A cluster with ample capacity, nothing busy and nothing queued."""
    n = len(llms)
    return ClusterView(
        names=tuple(x.name for x in llms),
        models=tuple(x.model for x in llms),
        model_cols=np.array([x.model_col for x in llms], dtype=np.int64),
        price_in_per_mtok=np.array([x.price_in_per_mtok for x in llms], dtype=float),
        price_out_per_mtok=np.array([x.price_out_per_mtok for x in llms], dtype=float),
        up=np.ones(n, dtype=bool),
        capacity=np.full(n, 1_000_000, dtype=np.int64),
        busy=np.zeros(n, dtype=np.int64),
        queue_len=np.zeros(n, dtype=np.int64),
        max_queue=np.full(n, 1_000_000, dtype=np.int64),
        mean_service_s=np.full(n, mean_service_s, dtype=float),
    )


@dataclass(frozen=True)
class OfflineResult:
    quality_pct: float  # % of the reference LLM's quality on the same rows
    cost_pct: float  # % of the reference LLM's cost on the same rows
    quality_sum: float
    cost_usd: float
    route_share: dict[str, float]
    chosen: np.ndarray  # (n_rows,) index into llms of the answer kept
    attempts: np.ndarray  # (n_rows,) LLM calls made per query
    realised_picks: int = 0  # fan-outs kept by realised quality (> 0: an upper bound)


def evaluate_offline(
    policy,
    workload: Workload,
    llms: Sequence[LLMInfo],
    rows: np.ndarray,
    *,
    reference: LLMInfo,
    feedback_probability: float = 0.0,
    feedback_noise: float = 0.0,
    judge: JudgeSpec | None = None,
    seed: int = 0,
    max_attempts: int = 8,
) -> OfflineResult:
    """Route each row once, in order; optionally deliver binary feedback right after.

    `policy.setup` must already have been called. Feedback (probability, label-flip noise)
    and the cascade judge use their own generators from `seed`, so two policies evaluated with
    the same seed see the same users. `judge`: the scorer of cascade answers and best-judged
    fan-outs, and what it costs (default: the scenario default, 84% accurate and free).
    """
    judge = (judge or JudgeSpec()).info()
    view = idle_view(llms)
    index = {x.name: i for i, x in enumerate(llms)}
    ss = np.random.SeedSequence(seed)
    fb_rng, judge_rng = (np.random.default_rng(s) for s in ss.spawn(2))
    n = len(rows)
    gives_fb = fb_rng.random(n) < feedback_probability
    flips = fb_rng.random(n) < feedback_noise
    # One judge draw per LLM call; a single fan-out may call every LLM, past max_attempts.
    judge_eps = judge_rng.normal(0.0, judge.noise, size=(n, max_attempts + len(llms)))
    pin = view.price_in_per_mtok
    pout = view.price_out_per_mtok
    cols = view.model_cols
    chosen = np.empty(n, dtype=np.int64)
    attempts = np.zeros(n, dtype=np.int64)
    quality_sum = 0.0
    cost_sum = 0.0
    realised_picks = 0
    for i, row in enumerate(rows):
        row = int(row)
        q = Query(
            id=i,
            row=row,
            arrival_s=float(i),
            input_tokens=int(workload.input_tokens[row]),
            task=int(workload.task[row]),
        )
        decision: Decision | None = policy.route(q, view)
        kept_quality = 0.0
        kept = -1
        k = 0
        while decision is not None:
            targets = (decision.llm, *decision.extra)
            quals = []
            answer_tokens = []
            for name in targets:
                j = index.get(name)
                if j is None:
                    raise RouteSimError(
                        f"policy {policy.name!r} chose {name!r}, not one of {view.names}",
                        field="decision.llm",
                    )
                qual = float(workload.quality[row, cols[j]])
                cost_sum += float(
                    request_cost_usd(
                        q.input_tokens, workload.output_tokens[row, cols[j]], pin[j], pout[j]
                    )
                )
                quals.append((qual, j, k))
                answer_tokens.append(float(workload.output_tokens[row, cols[j]]))
                k += 1
            # Ties go to the earlier answer of the decision (the primary first).
            if decision.keep == "best_realised":
                kept_quality, kept, _ = max(quals, key=lambda p: (p[0], -p[2]))
                realised_picks += len(quals) > 1
            elif decision.keep == "best_judged" and len(quals) > 1:
                # As in the engine, only a fan-out is judged: one answer is kept as it is.
                kept_quality, kept, _ = max(
                    quals,
                    key=lambda p: (float(np.clip(p[0] + judge_eps[i, p[2]], 0.0, 1.0)), -p[2]),
                )
                cost_sum += float(np.sum(judge.answer_cost_usd(q.input_tokens,
                                                               np.array(answer_tokens))))
            else:
                kept_quality, kept, _ = quals[0]
            # As in the engine: a fan-out ends the request, and so does a final decision;
            # another single answer goes to the judge and then to on_answer, for policies
            # that want answers (cascades).
            if (k >= max_attempts or decision.extra or decision.final
                    or not _wants_answers(policy)):
                break
            cost_sum += judge.answer_cost_usd(q.input_tokens, answer_tokens[0])
            ans = Answer(
                llm=llms[kept].name,
                judge_score=float(np.clip(kept_quality + judge_eps[i, k - 1], 0.0, 1.0)),
                cost_usd=0.0,
                latency_s=0.0,
            )
            decision = policy.on_answer(q, ans, view)
        chosen[i] = kept
        attempts[i] = k
        quality_sum += kept_quality
        if gives_fb[i]:
            reward = float(kept_quality >= 0.5)
            if flips[i]:
                reward = 1.0 - reward
            policy.feedback(
                Feedback(query_id=i, row=row, llm=llms[kept].name, reward=reward, time_s=float(i))
            )
    ref_col = reference.model_col
    ref_q = float(workload.quality[rows, ref_col].sum())
    ref_c = float(
        request_cost_usd(
            workload.input_tokens[rows],
            workload.output_tokens[rows, ref_col],
            reference.price_in_per_mtok,
            reference.price_out_per_mtok,
        ).sum()
    )
    counts = np.bincount(chosen, minlength=len(llms))
    return OfflineResult(
        quality_pct=100.0 * quality_sum / ref_q if ref_q > 0 else float("nan"),
        cost_pct=100.0 * cost_sum / ref_c if ref_c > 0 else float("nan"),
        quality_sum=quality_sum,
        cost_usd=cost_sum,
        route_share={x.name: float(c) / max(n, 1) for x, c in zip(llms, counts, strict=True)},
        chosen=chosen,
        attempts=attempts,
        realised_picks=realised_picks,
    )


def _wants_answers(policy) -> bool:
    """True when the policy overrides `on_answer` (cascades); others stop after one call."""
    from_base = getattr(type(policy).on_answer, "__qualname__", "").startswith("BasePolicy.")
    return not from_base
