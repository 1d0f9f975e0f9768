"""MixLLM's non-parametric critic: a neighbourhood posterior of each LLM's quality.

The offline kNN predictor says LLM m answers query j well with probability q_off(j, m), an
average of `prior_n` training answers near j. Each answer observed online (query i served by
m, reward r) is one more answer near every query j that has i among its `n_neighbours`
nearest workload rows, so the online estimate is the posterior mean

    q(j, m) = (prior_n * q_off(j, m) + sum of r over observed neighbours) /
              (prior_n + number of observed neighbours)

which starts at the offline prediction, moves only as evidence near j piles up, and corrects
the winner's curse (the LLM chosen is the one whose quality was over-predicted, and only the
chosen LLM is observed) locally, where a linear correction on a low-dimensional context
cannot. It needs no gradient steps: a batch of feedback adds counts along precomputed reverse
neighbour lists, O(batch x n_neighbours), and the decision itself only indexes arrays.

The neighbour lists are computed once for every workload row (cosine similarity of the same
inputs the kNN predictor uses): O(n^2 d) at setup (a second for RouterBench's 3,150 usable
rows), in blocks of rows so memory stays O(n K).
"""

from __future__ import annotations

import numpy as np

# Entries per block of the all-pairs similarity, whatever n is: the block (float32) and its
# argpartition (int64) take 48 MiB at most.
BLOCK_ENTRIES = 1 << 22


def nearest_rows(x: np.ndarray, k: int) -> np.ndarray:
    """(n, k) int32: each row's k most cosine-similar rows of `x` (itself among them, unless
    more than k rows are identical to it)."""
    n = x.shape[0]
    k = max(1, min(k, n))
    xn = x.astype(np.float32, copy=True)
    xn /= np.maximum(np.linalg.norm(xn, axis=1, keepdims=True), 1e-12)
    out = np.empty((n, k), dtype=np.int32)
    step = max(1, BLOCK_ENTRIES // n)
    for s in range(0, n, step):
        sim = xn[s : s + step] @ xn.T
        if k < n:
            out[s : s + step] = np.argpartition(sim, n - k, axis=1)[:, n - k :]
        else:
            out[s : s + step] = np.arange(n)
    return out


class NeighbourPosterior:
    """Counts of observed answers near every workload row, per workload model column."""

    def __init__(self, neighbours: np.ndarray, n_models: int):
        n, k = neighbours.shape
        # Reverse lists: observing row i informs every row j with i among j's neighbours.
        flat = neighbours.ravel()
        order = np.argsort(flat, kind="stable")
        self._owners = np.repeat(np.arange(n, dtype=np.int32), k)[order]
        self._ptr = np.searchsorted(flat[order], np.arange(n + 1))
        self.count = np.zeros((n, n_models))
        self.total = np.zeros((n, n_models))

    def observe(self, rows: np.ndarray, cols: np.ndarray, rewards: np.ndarray) -> np.ndarray:
        """Add answers (workload row, model column, reward in [0, 1]); returns the model
        columns whose estimates changed."""
        if len(rows) == 0:
            return np.empty(0, dtype=np.int64)
        starts, ends = self._ptr[rows], self._ptr[rows + 1]
        sizes = ends - starts
        # Every (owner, column, reward) triple of the batch at once.
        offsets = np.repeat(starts - np.cumsum(sizes) + sizes, sizes) + np.arange(sizes.sum())
        n, m = self.count.shape
        cells = self._owners[offsets].astype(np.int64) * m + np.repeat(cols, sizes)
        # bincount, not np.add.at: 4-5x faster, and exact for counts and binary rewards.
        self.count += np.bincount(cells, minlength=n * m).reshape(n, m)
        self.total += np.bincount(
            cells, weights=np.repeat(rewards, sizes).astype(np.float64), minlength=n * m
        ).reshape(n, m)
        return np.unique(cols)

    def posterior(self, col: int, prior_q: np.ndarray, prior_n: float) -> np.ndarray:
        """(n,) posterior mean quality of model column `col` given its offline predictions
        `prior_q`, each worth `prior_n` answers."""
        return (prior_n * prior_q + self.total[:, col]) / (prior_n + self.count[:, col])

    def forget(self, col: int) -> None:
        """Drop what was observed for model column `col` (its predictor was refitted)."""
        self.count[:, col] = 0.0
        self.total[:, col] = 0.0
