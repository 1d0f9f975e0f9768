"""MixLLM's continual training from user feedback: a dynamic-feedback score network.

The network adds a learned correction delta_m(z) to each workload model's predicted quality
(z: the query's low-dimensional context, see `policy.py`). It is an ensemble of `n_heads`
linear heads per model; the correction used for routing is the ensemble mean, and the
ensemble's spread is the uncertainty of the score estimate.

Learning is policy gradient (REINFORCE with a baseline) on the routing policy
pi(l | x) = softmax_l(S_l / T), where S_l is the decision score with the correction inside it
(S_l = lambda/(1+lambda) * (q_hat_l + delta_l) - cost + bonus) and T a temperature. For a
feedback (x, chosen a, reward r):

    advantage = kappa * (r - clip(q_hat_a + delta_a, 0, 1))  # baseline: predicted quality
    grad of log pi(a | x) w.r.t. delta_j = (1[j = a] - pi_j)  (up to the constant
                                             lambda/(1+lambda) / T, folded into the step size)

and every head e takes W_e[j] += lr * omega_e * advantage * (g * grad_j + c * 1[j = a]) * z,
g = `pg_weight`. The optional c * 1[j = a] term (`critic_weight`, 0 by default) also regresses
the baseline itself toward r (actor-critic on shared parameters); on RouterBench it lowered
quality at equal cost, so the default is the pure policy gradient, whose low temperature
concentrates learning on close calls. kappa = eps / (Var_e[delta_a] + eps), i.e. the issue's
1 / (Var + eps) scaled by eps into (0, 1]: updates where the heads disagree (the estimate is
unreliable) count less.
omega_e ~ 2 * Bernoulli(1/2) is a per-head bootstrap mask, so the heads stay diverse and
their variance stays a meaningful uncertainty. Binary rewards (thumbs up/down) and refined
(continuous, in [0, 1]) rewards go through the same update.

Feedback is queued and applied in batches (`update_every` in the policy) so a routing
decision only does one small matrix-vector product. The correction is bounded by
`max_correction` through a cap on every head's weight norm (no clipping per decision).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OnlineConfig:
    """Hyper-parameters of the dynamic-feedback score network."""

    n_heads: int = 8
    lr: float = 0.01
    temperature: float = 0.03
    eps: float = 0.01
    critic_weight: float = 0.0  # > 0 also regresses the baseline toward the reward
    pg_weight: float = 1.0  # 0 leaves only the baseline regression (a value-learning bandit)
    weight_decay: float = 1e-3  # per batch, pulls the correction back toward 0
    init_std: float = 0.05
    max_correction: float = 0.5  # bound on |delta| (enforced through the weight norms)


class FeedbackScoreNet:
    """Ensemble of linear heads giving a quality correction per (workload model, context)."""

    def __init__(
        self,
        n_models: int,
        dim: int,
        cfg: OnlineConfig,
        rng: np.random.Generator,
        *,
        z_norm_max: float = 1.0,
    ):
        self.cfg = cfg
        self.dim = dim
        self.rng = rng
        # |delta| = |w . z| <= |w| |z|: bounding every head's weight norm bounds the
        # correction without clipping at decision time.
        self._w_norm_max = cfg.max_correction / max(z_norm_max, 1e-12)
        w = rng.normal(0.0, cfg.init_std / np.sqrt(dim), size=(cfg.n_heads, n_models, dim))
        # Centre the heads: the initial mean correction is exactly 0 (routing starts as the
        # offline policy) while the heads still disagree (initial uncertainty).
        w -= w.mean(axis=0, keepdims=True)
        self.w = w
        self._project()
        self.mean_w = w.mean(axis=0)
        self.updates = 0
        self.version = 0  # bumped by every update (callers cache mean_w rows by it)

    def correction(self, cols: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Mean correction delta_m(z) for each model column in `cols` (decision time)."""
        return self.mean_w[cols] @ z

    def corrections_mean(self, z: np.ndarray) -> np.ndarray:
        """(B, n_models) mean corrections for contexts z (B, dim), every model column."""
        return z @ self.mean_w.T

    def _project(self) -> None:
        norms = np.linalg.norm(self.w, axis=2, keepdims=True)
        self.w *= np.minimum(1.0, self._w_norm_max / np.maximum(norms, 1e-12))

    def update(
        self,
        z: np.ndarray,
        cand_cols: np.ndarray,
        chosen: np.ndarray,
        base_scores: np.ndarray,
        q_hat_chosen: np.ndarray,
        reward: np.ndarray,
        quality_w: float,
    ) -> None:
        """One batched policy-gradient step.

        z: (B, dim) contexts; cand_cols: (L,) workload model column of each candidate;
        chosen: (B,) index into cand_cols of the LLM that answered; base_scores: (B, L) the
        decision scores without the correction; q_hat_chosen: (B,) offline predicted quality
        of the chosen model; reward: (B,) in [0, 1]; quality_w: lambda / (1 + lambda).
        """
        cfg = self.cfg
        b = z.shape[0]
        if b == 0:
            return
        heads = np.einsum("bd,eld->ebl", z, self.w[:, cand_cols])  # (E, B, L)
        delta = heads.mean(axis=0)  # (B, L)
        rows = np.arange(b)
        logits = (base_scores + quality_w * delta) / cfg.temperature
        logits -= logits.max(axis=1, keepdims=True)
        pi = np.exp(logits)
        pi /= pi.sum(axis=1, keepdims=True)
        var_a = heads[:, rows, chosen].var(axis=0)
        kappa = cfg.eps / (var_a + cfg.eps)
        q_est = np.clip(q_hat_chosen + delta[rows, chosen], 0.0, 1.0)
        adv = kappa * (reward - q_est)
        onehot = np.zeros_like(pi)
        onehot[rows, chosen] = 1.0
        grad = adv[:, None] * (cfg.pg_weight * (onehot - pi) + cfg.critic_weight * onehot)
        omega = 2.0 * (self.rng.random((cfg.n_heads, b)) < 0.5)
        step = cfg.lr * np.einsum("eb,bl,bd->eld", omega, grad, z)  # (E, L, dim)
        self.w *= 1.0 - cfg.weight_decay
        # add.at: two deployments of one model share a column and both contribute.
        np.add.at(self.w, (slice(None), cand_cols), step)
        self._project()
        self.mean_w = self.w.mean(axis=0)
        self.updates += b
        self.version += 1
