"""MixLLM's continual training from user feedback: a dynamic-feedback score network.

The network adds a learned correction delta_m(z) to each workload model's predicted quality
(z: the query's low-dimensional context, see `policy.py`). It is an ensemble of `n_heads`
linear heads per model; the correction used for routing is the ensemble mean, and the
ensemble's spread is the uncertainty of the score estimate. Each head has two parts, both
learned from the same binary (or refined, continuous) rewards:

- a critic: a ridge regression of the residual r - q_hat_a of the chosen model a on z,
  A_m = prior_n * diag(s) + sum kappa * z z^T, b_m = sum kappa * z * (r - q_hat_a),
  w_m = A_m^-1 b_m. prior_n is how many observations the offline prediction is worth (the
  kNN predictor averages `knn_k` answers, so the policy passes that): the correction is the
  posterior mean of "offline prediction + feedback", so it starts at 0, moves only as
  evidence piles up, and fixes the winner's curse of the offline estimates (the chosen LLM
  is the one whose quality was over-predicted, and only the chosen LLM is observed). s
  (`prior_scale`) makes the prior stronger along some inputs: the policy uses it so that a
  per-task bias is learned sooner than a dependence on the embedding, which the offline
  kNN has already fitted and which, fitted again on a few hundred rewards, is mostly noise.
- an actor: policy gradient (REINFORCE with a baseline) on the routing policy
  pi(l | x) = softmax_l(S_l / T), S_l being the decision score with the correction inside it
  (S_l = lambda/(1+lambda) * (q_hat_l + delta_l) - cost + bonus), T a temperature:

      advantage = kappa * (r - clip(q_hat_a + delta_a, 0, 1))   # baseline: the critic
      grad of log pi(a | x) w.r.t. delta_j = (1[j = a] - pi_j)   (constants in the step)
      V_e[j] += lr * omega_e * advantage * (1[j = a] - pi_j) * z

  The low temperature concentrates it on close calls, the decisions it can change.

kappa = eps / (Var_e[delta_a] + eps), i.e. the issue's 1 / (Var + eps) scaled by eps into
(0, 1]: updates where the heads disagree (the estimate is unreliable) count less. omega_e is
a per-head bootstrap weight (2 * Bernoulli(1/2)) in both parts, so the heads stay diverse
and their variance stays a meaningful uncertainty.

Feedback is queued and applied in batches (`update_every` in the policy) so a routing
decision only does one small matrix-vector product. Each part's correction is bounded by
`max_correction` through a cap on its weight norms (a ridge fit of residuals in [-1, 1] can
still extrapolate far beyond them along directions it has seen little of), so no clipping is
needed per decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OnlineConfig:
    """Hyper-parameters of the dynamic-feedback score network."""

    n_heads: int = 8
    lr: float = 0.01  # actor step size
    temperature: float = 0.03  # of the actor's softmax policy
    eps: float = 0.01  # kappa = eps / (Var + eps)
    prior_n: float = 100.0  # critic: observations the offline prediction is worth
    # critic: per-dimension multiplier of prior_n (None: 1 everywhere); the policy makes the
    # prior stronger on the embedding context than on the task one-hot
    prior_scale: tuple[float, ...] | None = None
    critic_weight: float = 1.0  # 0 turns the critic off (actor only)
    pg_weight: float = 1.0  # 0 turns the actor off (critic only)
    weight_decay: float = 1e-3  # actor, per batch: pulls its correction back toward 0
    init_std: float = 0.05  # actor heads' initial spread (the initial uncertainty)
    max_correction: float = 0.5  # bound on each part's |delta| (actor, critic)


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
        # |delta| = |v . z| <= |v| |z|: bounding every actor head's weight norm bounds its
        # correction without clipping at decision time.
        self._w_norm_max = cfg.max_correction / max(z_norm_max, 1e-12)
        v = rng.normal(0.0, cfg.init_std / np.sqrt(dim), size=(cfg.n_heads, n_models, dim))
        # Centre the heads: the initial mean correction is exactly 0 (routing starts as the
        # offline policy) while the heads still disagree (initial uncertainty).
        v -= v.mean(axis=0, keepdims=True)
        self.v = v  # actor weights (E, M, d)
        self._project()
        # Critic: per (head, model) the ridge system A w = b.
        scale = np.ones(dim) if cfg.prior_scale is None else np.asarray(cfg.prior_scale, float)
        if scale.shape != (dim,):
            raise ValueError(f"prior_scale has {scale.shape} entries; the context has {dim}")
        self._prior_diag = scale
        self.a = np.broadcast_to(
            np.diag(scale * cfg.prior_n), (cfg.n_heads, n_models, dim, dim)
        ).copy()
        self.b = np.zeros((cfg.n_heads, n_models, dim))
        self.c = np.zeros_like(self.v)  # critic weights A^-1 b
        self.w = self.v + self.c
        self.mean_w = self.w.mean(axis=0)
        self.updates = 0
        self.version = 0  # bumped by every update (callers cache mean_w rows by it)

    def correction(self, cols: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Mean correction delta_m(z) for each model column in `cols` (decision time)."""
        return self.mean_w[cols] @ z

    def corrections_mean(self, z: np.ndarray) -> np.ndarray:
        """(B, n_models) mean corrections for contexts z (B, dim), every model column."""
        return z @ self.mean_w.T

    def set_prior(self, col: int, prior_n: float) -> None:
        """Restart model column `col`'s critic with a prior worth `prior_n` observations
        (an LLM added with a weaker offline prediction than the others: a few warm-start
        rows, or none)."""
        self.a[:, col] = np.diag(self._prior_diag * prior_n)
        self.b[:, col] = 0.0
        self.c[:, col] = 0.0
        self.w = self.v + self.c
        self.mean_w = self.w.mean(axis=0)
        self.version += 1

    def _project(self) -> None:
        norms = np.linalg.norm(self.v, axis=2, keepdims=True)
        self.v *= np.minimum(1.0, self._w_norm_max / np.maximum(norms, 1e-12))

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
        """One batched step of critic and actor.

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
        var_a = heads[:, rows, chosen].var(axis=0)
        kappa = cfg.eps / (var_a + cfg.eps)
        omega = 2.0 * (self.rng.random((cfg.n_heads, b)) < 0.5)  # (E, B)
        if cfg.critic_weight > 0:
            weight = cfg.critic_weight * omega * kappa  # (E, B)
            resid = reward - q_hat_chosen
            cols_b = cand_cols[chosen]  # (B,) workload column of each chosen LLM
            for col in np.unique(cols_b):
                sel = cols_b == col
                zs, ws = z[sel], weight[:, sel]  # (k, d), (E, k)
                self.a[:, col] += np.einsum("ek,kd,kf->edf", ws, zs, zs)
                self.b[:, col] += (ws * resid[sel]) @ zs
                c = np.linalg.solve(self.a[:, col], self.b[:, col][..., None])[..., 0]
                norms = np.linalg.norm(c, axis=1, keepdims=True)
                self.c[:, col] = c * np.minimum(1.0, self._w_norm_max / np.maximum(norms, 1e-12))
        if cfg.pg_weight > 0:
            logits = (base_scores + quality_w * delta) / cfg.temperature
            logits -= logits.max(axis=1, keepdims=True)
            pi = np.exp(logits)
            pi /= pi.sum(axis=1, keepdims=True)
            q_est = np.clip(q_hat_chosen + delta[rows, chosen], 0.0, 1.0)
            adv = kappa * (reward - q_est)
            onehot = np.zeros_like(pi)
            onehot[rows, chosen] = 1.0
            grad = cfg.pg_weight * adv[:, None] * (onehot - pi)
            step = cfg.lr * np.einsum("eb,bl,bd->eld", omega, grad, z)  # (E, L, dim)
            self.v *= 1.0 - cfg.weight_decay
            # add.at: two deployments of one model share a column and both contribute.
            np.add.at(self.v, (slice(None), cand_cols), step)
            self._project()
        self.w = self.v + self.c
        self.mean_w = self.w.mean(axis=0)
        self.updates += b
        self.version += 1
