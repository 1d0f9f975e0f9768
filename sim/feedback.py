"""Simulated users: patience while queued, and thumbs up/down (or refined) feedback.

Every per-request draw is made before the run, indexed by request id, from the users' and
feedback generators. Two policies on one seed therefore face the very same users: the same
patience, the same decision to give feedback, the same delay and the same label noise
(common random numbers), which makes paired comparisons tight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.scenario import Distribution, FeedbackSpec, UsersSpec


def sample_distribution(dist: Distribution, n: int, rng: np.random.Generator) -> np.ndarray:
    """n positive draws with mean `dist.mean`."""
    if dist.kind == "exponential":
        return rng.exponential(dist.mean, size=n)
    if dist.kind == "deterministic":
        return np.full(n, dist.mean)
    if dist.kind == "uniform":
        return rng.uniform(0.0, 2.0 * dist.mean, size=n)
    # lognormal with the requested mean and coefficient of variation
    sigma2 = np.log1p(dist.cv**2)
    mu = np.log(dist.mean) - sigma2 / 2.0
    return rng.lognormal(mu, np.sqrt(sigma2), size=n)


@dataclass(frozen=True, eq=False)
class UserDraws:
    """Per-request user behaviour, precomputed."""

    patience_s: np.ndarray  # inf when users never give up
    gives_feedback: np.ndarray  # bool
    delay_s: np.ndarray
    noise: np.ndarray  # uniform in [0, 1) for binary flips, N(0, 1) for refined noise
    spec: FeedbackSpec

    def reward(self, rid: int, quality: float) -> float:
        """The user's reward for a realised quality in [0, 1].

        Binary: thumbs up when quality >= 0.5, flipped with probability `noise`.
        Refined: quality plus Gaussian noise of std `noise`, clipped to [0, 1].
        """
        if self.spec.mode == "binary":
            up = quality >= 0.5
            if self.noise[rid] < self.spec.noise:
                up = not up
            return 1.0 if up else 0.0
        return float(min(1.0, max(0.0, quality + self.spec.noise * self.noise[rid])))


def draw_users(
    n: int,
    users: UsersSpec,
    feedback: FeedbackSpec,
    users_rng: np.random.Generator,
    feedback_rng: np.random.Generator,
) -> UserDraws:
    if users.patience_s is None:
        patience = np.full(n, np.inf)
    else:
        patience = sample_distribution(users.patience_s, n, users_rng)
    gives = feedback_rng.random(n) < feedback.probability
    delay = sample_distribution(feedback.delay_s, n, feedback_rng)
    if feedback.mode == "binary":
        noise = feedback_rng.random(n)
    else:
        noise = feedback_rng.standard_normal(n)
    return UserDraws(patience, gives, delay, noise, feedback)
