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
neighbour lists (one sparse product, O(batch x n_neighbours), plus an add over the (n, C)
counts), and the decision itself only indexes arrays.

Bandit feedback shows the chosen LLM's answer only, but answers to one query are correlated
across LLMs, so a reward also says something about the LLMs not chosen. `AnswerCorrelation`
turns each reward into expected answers of the others (from the answers the query's nearest
training rows got), which the posterior counts as observations too (`online_impute`), each
worth one observed answer or, with `online_impute_worth: r2`, its squared correlation.

The neighbour lists are computed once for every workload row (cosine similarity of the same
inputs the kNN predictor uses): O(n^2 d) at setup (a second for RouterBench's 3,150 usable
rows), in blocks of rows so memory stays O(n K).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

# Entries per block of the all-pairs similarity, whatever n is: the block (float32) and its
# argpartition (int64) take 48 MiB at most.
BLOCK_ENTRIES = 1 << 22
# Largest table (every row's sums and products together) `AnswerCorrelation` precomputes, in
# bytes; beyond it (many workload rows and LLMs), each feedback batch sums its rows'
# neighbours' answers instead.
CORRELATION_TABLE_BYTES = 256 * 2**20


def nearest_rows(x: np.ndarray, k: int, among: np.ndarray | None = None) -> np.ndarray:
    """(n, k) int32: each row's k most cosine-similar rows of `x` (itself among them, unless
    more than k rows are identical to it); with `among` (row indices), its k most similar
    rows of x[among], as positions in `among`."""
    n = x.shape[0]
    xn = x.astype(np.float32, copy=True)
    xn /= np.maximum(np.linalg.norm(xn, axis=1, keepdims=True), 1e-12)
    cand = xn if among is None else xn[among]
    m = cand.shape[0]
    k = max(1, min(k, m))
    out = np.empty((n, k), dtype=np.int32)
    step = max(1, BLOCK_ENTRIES // max(m, 1))
    for s in range(0, n, step):
        sim = xn[s : s + step] @ cand.T
        if k < m:
            out[s : s + step] = np.argpartition(sim, m - k, axis=1)[:, m - k :]
        else:
            out[s : s + step] = np.arange(m)
    return out


class AnswerCorrelation:
    """What one LLM's observed reward says about the others' answers to the same query.

    Answers to a query are correlated across LLMs (a query one gets wrong is often hard for
    the others too), so bandit feedback on the chosen LLM carries information about the
    LLMs not chosen. For each workload row j and its `k` nearest training rows (with every
    LLM's answer known), the expected answer of LLM m given that LLM l earned reward y on j
    is the neighbours' mean answer of m, each neighbour weighted by the likelihood of y
    under its own answer from l (a for y = 1, 1 - a for y = 0):

        E[a_m | r_l = y] = (prior_n * q_off(j, m) + sum_i w_i a_im) / (prior_n + sum_i w_i),
        w_i = y a_il + (1 - y) (1 - a_il),

    shrunk towards the offline prediction q_off by `prior_n` answers where few neighbours
    agree with y. It needs the sums sum_i a_il a_im (C x C per row) and sum_i a_im: computed
    for every row before the run when that table fits in `table_bytes`, so a batch of
    feedback only gathers entries; otherwise from the neighbours' answers, batch by batch.
    """

    def __init__(self, neighbours: np.ndarray, answers: np.ndarray, prior_n: float = 5.0,
                 table_bytes: int = CORRELATION_TABLE_BYTES):
        """`neighbours`: (n, k) positions of each workload row's nearest training rows in
        `answers` (n_train, C), the training rows' answers of the C model columns."""
        n, k = neighbours.shape
        c = answers.shape[1]
        self.k = float(k)
        self.prior_n = float(prior_n)
        self.neighbours = neighbours
        self._answers = np.asarray(answers, dtype=np.float64)
        self.sums: np.ndarray | None = None
        self.products: np.ndarray | None = None
        if n * c * (c + 1) * 8 <= table_bytes:
            self.sums = np.empty((n, c))
            self.products = np.empty((n, c, c))
            step = max(1, BLOCK_ENTRIES // max(k * c, 1))
            for s in range(0, n, step):
                self.sums[s : s + step], self.products[s : s + step] = self._from_answers(
                    np.arange(s, min(s + step, n)))

    def _from_answers(self, rows: np.ndarray, observed: np.ndarray | None = None):
        """sum_i a_im (b, C) and sum_i a_il a_im: (b, C, C) for every l, or (b, C) for the
        `observed` l of each row."""
        nb = self._answers[self.neighbours[rows]]  # (b, k, C)
        if observed is None:
            return nb.sum(axis=1), nb.transpose(0, 2, 1) @ nb
        a_l = nb[np.arange(len(rows)), :, observed]  # (b, k)
        return nb.sum(axis=1), np.einsum("bk,bkc->bc", a_l, nb)

    def __deepcopy__(self, memo: dict) -> AnswerCorrelation:
        # Never modified after construction: copies of a policy (one per frontier point)
        # share it instead of duplicating its tables.
        return self

    def expected(self, rows: np.ndarray, observed: np.ndarray, reward: np.ndarray,
                 prior_q: np.ndarray, *, with_worth: bool = True
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        """Every column's expected answer on `rows` (b, C) given that column `observed`
        (positions among the C) earned `reward` (in [0, 1]) there, `prior_q` (b, C) being
        the offline predictions; and (with `with_worth`, else None) what each is worth in
        observed answers (b, C): the squared correlation of the two columns' answers over
        the neighbours (the share of one answer's variance the other explains), by which an
        uncorrelated column's imputed answer would add nothing to dilute its real ones. The
        observed column's entry is the reward itself, worth 1."""
        y = np.asarray(reward, dtype=np.float64)[:, None]
        b = np.arange(len(rows))
        if self.products is not None:
            s, both = self.sums[rows], self.products[rows, observed]
        else:
            s, both = self._from_answers(rows, observed)
        s_l = s[b, observed][:, None]
        num = y * both + (1.0 - y) * (s - both)
        den = y * s_l + (1.0 - y) * (self.k - s_l)
        out = (self.prior_n * prior_q + num) / (self.prior_n + den)
        out[b, observed] = y[:, 0]
        if not with_worth:
            return out, None
        mean = s / self.k
        var = self._squares(rows) / self.k - mean**2  # (b, C)
        cov = both / self.k - mean[b, observed][:, None] * mean
        scale = var[b, observed][:, None] * var
        weight = np.divide(cov**2, scale, out=np.zeros_like(cov), where=scale > 1e-12)
        np.clip(weight, 0.0, 1.0, out=weight)
        weight[b, observed] = 1.0
        return out, weight

    def _squares(self, rows: np.ndarray) -> np.ndarray:
        """sum_i a_im^2 (b, C)."""
        if self.products is not None:
            return np.diagonal(self.products[rows], axis1=1, axis2=2)
        return (self._answers[self.neighbours[rows]] ** 2).sum(axis=1)


class NeighbourPosterior:
    """Counts of observed answers near every workload row, per workload model column."""

    def __init__(self, neighbours: np.ndarray, n_models: int):
        n, k = neighbours.shape
        # Reverse lists as a sparse (n, n) matrix: column i holds the rows j with i among
        # j's neighbours (observing row i informs each of them). Its product with a batch's
        # per-row increments spreads them in one compiled pass; expanding the batch along
        # the lists with numpy took 3x as long.
        self._spread = sp.csr_matrix(
            (np.ones(n * k, dtype=np.float32), neighbours.ravel(),
             np.arange(0, n * k + 1, k)), shape=(n, n),
        ).tocsc()
        self.count = np.zeros((n, n_models))
        self.total = np.zeros((n, n_models))

    def __deepcopy__(self, memo: dict) -> NeighbourPosterior:
        # The reverse lists never change: copies of a policy (one per frontier point) share
        # them and copy only the counts.
        new = object.__new__(NeighbourPosterior)
        new._spread = self._spread
        new.count = self.count.copy()
        new.total = self.total.copy()
        return new

    def observe(self, rows: np.ndarray, cols: np.ndarray, rewards: np.ndarray,
                weights: np.ndarray | None = None) -> np.ndarray:
        """Add answers (workload row, model column, reward in [0, 1]), each worth `weights`
        answers (default 1); returns the model columns whose estimates changed."""
        if len(rows) == 0:
            return np.empty(0, dtype=np.int64)
        n, m = self.count.shape
        rewards = np.asarray(rewards, dtype=np.float64)
        # The batch as (count, reward total) increments per distinct row and column, then
        # spread to every row whose neighbourhood holds that row.
        uniq, inv = np.unique(rows, return_inverse=True)
        cells = inv * m + cols
        if weights is None:
            counts = np.bincount(cells, minlength=len(uniq) * m).astype(np.float64)
        else:
            weights = np.asarray(weights, dtype=np.float64)
            counts = np.bincount(cells, weights=weights, minlength=len(uniq) * m)
            rewards = rewards * weights
        totals = np.bincount(cells, weights=rewards, minlength=len(uniq) * m)
        spread = self._spread[:, uniq] @ np.hstack(
            [counts.reshape(-1, m), totals.reshape(-1, m)])
        self.count += spread[:, :m]
        self.total += spread[:, m:]
        return np.unique(cols)

    def posterior(self, col: int, prior_q: np.ndarray, prior_n: float) -> np.ndarray:
        """(n,) posterior mean quality of model column `col` given its offline predictions
        `prior_q`, each worth `prior_n` answers."""
        return (prior_n * prior_q + self.total[:, col]) / (prior_n + self.count[:, col])

    def forget(self, col: int) -> None:
        """Drop what was observed for model column `col` (its predictor was refitted)."""
        self.count[:, col] = 0.0
        self.total[:, col] = 0.0
