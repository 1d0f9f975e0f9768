"""MixLLM's meta decision maker: the score of each candidate LLM and the LinUCB uncertainty.

For a query with context x and candidate LLM l (Wang et al., NAACL 2025, arXiv 2502.18482,
meta decision maker; the form below is the one the project's issue 6 fixes):

    score_l = lambda/(1+lambda) * q_hat_l - 1/(1+lambda) * c_hat_l
              + alpha * sqrt(x^T A_l^-1 x) - beta * exp(gamma * (w_l - xi * tau))

q_hat_l is the predicted quality (plus the online correction), c_hat_l the predicted cost
normalised by a fixed scale (see `cost_scale`), A_l = I + sum of x x^T over the queries l
served (LinUCB), w_l the expected wait at l seen through `ClusterView.est_wait_s` and tau the
users' tolerable wait. The chosen LLM is the argmax over the candidates that accept requests.
"""

from __future__ import annotations

import numpy as np

# exp() of more than this would overflow; a penalty of e^60 already dominates any score.
MAX_PENALTY_EXPONENT = 60.0


def quality_weight(lam: float) -> float:
    """lambda / (1 + lambda): the weight of predicted quality in the score."""
    return lam / (1.0 + lam)


def cost_weight(lam: float) -> float:
    """1 / (1 + lambda): the weight of normalised predicted cost in the score."""
    return 1.0 / (1.0 + lam)


def latency_penalty(
    wait_s: np.ndarray, *, beta: float, gamma: float, xi: float, tau_s: float
) -> np.ndarray:
    """beta * exp(gamma * (w - xi * tau)) per candidate; an infinite wait gives e^60 * beta
    (beta when gamma is 0: the penalty then does not depend on the wait).

    (The policy computes the same expression inline, with preallocated constants.)"""
    wait = np.asarray(wait_s, dtype=np.float64)
    if gamma == 0:
        return np.full(wait.shape, float(beta))
    expo = np.minimum(gamma * (wait - xi * tau_s), MAX_PENALTY_EXPONENT)
    return beta * np.exp(expo)


def meta_scores(
    q_hat: np.ndarray,
    c_norm: np.ndarray,
    uncertainty: np.ndarray,
    penalty: np.ndarray,
    *,
    lam: float,
    alpha: float,
) -> np.ndarray:
    """The documented score for aligned per-candidate arrays (`uncertainty` without alpha)."""
    return (
        quality_weight(lam) * q_hat - cost_weight(lam) * c_norm + alpha * uncertainty - penalty
    )


def ranked(scores: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
    """Indices of the best `k` allowed candidates, best first (ties: the lower index).

    Returns an empty array when nothing is allowed.
    """
    masked = np.where(allowed, scores, -np.inf)
    if k == 1:
        best = int(np.argmax(masked))
        return np.array([best]) if allowed[best] else np.empty(0, dtype=np.int64)
    order = np.argsort(-masked, kind="stable")
    return order[: min(k, int(allowed.sum()))]


def cost_scale(costs: np.ndarray) -> float:
    """The fixed normaliser of predicted costs (n_rows, n_llms): the mean over training rows
    of the highest predicted cost among the given LLMs (the policy passes the reference LLM
    alone when it knows it, so the unit is then its mean predicted cost).

    A fixed scale (not a per-query max) keeps the score a per-query Lagrangian of "total
    quality minus price x total cost", which is what the quality %/cost % metric rewards; with
    the reference LLM as the unit, lambda / (1 + lambda) vs 1 / (1 + lambda) trades one unit
    of quality against the cost of one typical query to the reference LLM.
    """
    scale = float(np.mean(np.max(costs, axis=1))) if costs.size else 0.0
    return scale if scale > 0 else 1.0


class LinUCBBank:
    """Per-LLM inverse design matrices A_l^-1 (LinUCB), updated by Sherman-Morrison.

    A slot is one deployment. A new slot starts at A = I / prior_scale (prior_scale > 1: more
    uncertain than a fresh slot). Contexts are the rows of `contexts` (one per query). Served
    contexts are queued by `observe` (as row numbers) and applied in batches by `flush`: the
    result of the rank-one updates

        A^-1 <- A^-1 - (A^-1 x)(A^-1 x)^T / (1 + x^T A^-1 x),

    one per context, computed for a whole batch at once (O(d^3) per slot and batch instead
    of O(d^2) per context; one context alone is one such step).
    """

    def __init__(self, contexts: np.ndarray, capacity: int = 16):
        self.contexts = contexts
        self.dim = dim = contexts.shape[1]
        self.ainv = np.zeros((capacity, dim, dim))
        self._eye = np.eye(dim)
        self.n_slots = 0
        self.version = 0  # bumped whenever some A^-1 changes (callers cache stacks by it)
        self._pending: dict[int, list[int]] = {}  # slot -> context rows, in order
        self.pending = 0  # contexts queued for the next flush

    def add_slot(self, prior_scale: float = 1.0) -> int:
        """A new slot with A = I / prior_scale; returns its index."""
        if self.n_slots == self.ainv.shape[0]:
            grown = np.zeros((2 * self.n_slots, self.dim, self.dim))
            grown[: self.n_slots] = self.ainv
            self.ainv = grown
        slot = self.n_slots
        self.ainv[slot] = np.eye(self.dim) * prior_scale
        self.n_slots += 1
        self.version += 1
        return slot

    def reset_slot(self, slot: int, prior_scale: float = 1.0) -> None:
        self.ainv[slot] = np.eye(self.dim) * prior_scale
        self.version += 1

    def observe(self, slot: int, row: int) -> None:
        """Queue "slot served the query of context row `row`" for the next `flush`."""
        rows = self._pending.get(slot)
        if rows is None:
            self._pending[slot] = [row]
        else:
            rows.append(row)
        self.pending += 1

    def flush(self) -> None:
        """Apply the queued updates: per slot, its k queued rank-one Sherman-Morrison updates
        at once, which equals applying them one by one. With X the slot's k contexts and
        G = X^T X, (A + G)^-1 = (I + A^-1 G)^-1 A^-1: a d x d solve whatever k, done for
        every slot in one batched call (a Woodbury k x k solve per slot cost 8x more at the
        default batch of 128)."""
        if not self.pending:
            return
        if self.pending == 1:
            ((slot, (row,)),) = self._pending.items()
            sherman_morrison_update(self.ainv[slot], self.contexts[row])
        else:
            touched = sorted(self._pending)
            gram = np.empty((len(touched), self.dim, self.dim))
            for i, slot in enumerate(touched):
                xs = self.contexts[self._pending[slot]]
                gram[i] = xs.T @ xs
            ainv = self.ainv[touched]
            m = ainv @ gram
            m += self._eye
            new = np.linalg.solve(m, ainv)
            # Keep A^-1 exactly symmetric so rounding does not accumulate over many batches.
            new += new.transpose(0, 2, 1)
            new *= 0.5
            self.ainv[touched] = new
        self._pending.clear()
        self.pending = 0
        self.version += 1


def sherman_morrison_update(ainv: np.ndarray, x: np.ndarray) -> None:
    """In place: A^-1 becomes (A + x x^T)^-1."""
    t = ainv @ x
    ainv -= np.outer(t, t) / (1.0 + float(x @ t))
