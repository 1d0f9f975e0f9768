"""MixLLM's neighbours critic: neighbour lists, the count posterior and its use in routing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_mixllm import infos, make_policy, make_workload, query

from policies.mixllm import neighbours
from policies.mixllm.neighbours import NeighbourPosterior, nearest_rows
from sim.offline import idle_view
from sim.types import SPLIT_TEST, SPLIT_VALID, Feedback


def brute_nearest(x: np.ndarray, k: int) -> list[set[int]]:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    return [set(np.argsort(-sim[i], kind="stable")[:k].tolist()) for i in range(len(x))]


def test_nearest_rows_match_brute_force_across_chunks(monkeypatch):
    monkeypatch.setattr(neighbours, "BLOCK_ENTRIES", 7 * 50)  # 7-row blocks, last partial
    x = np.random.default_rng(0).normal(size=(50, 5))
    got = nearest_rows(x, 6)
    assert got.shape == (50, 6)
    assert [set(r.tolist()) for r in got] == brute_nearest(x, 6)
    assert all(i in set(got[i].tolist()) for i in range(50))  # a row is its own neighbour
    assert nearest_rows(x[:4], 10).shape == (4, 4)  # k capped at the rows there are


def test_observe_counts_each_answer_in_every_neighbourhood_holding_it():
    rng = np.random.default_rng(1)
    nbr = nearest_rows(rng.normal(size=(40, 3)), 5)
    post = NeighbourPosterior(nbr, n_models=3)
    rows = np.array([3, 3, 17, 25])
    cols = np.array([0, 2, 0, 1])
    rewards = np.array([1.0, 0.0, 1.0, 0.5])
    changed = post.observe(rows, cols, rewards)
    assert changed.tolist() == [0, 1, 2]
    want_n, want_s = np.zeros((40, 3)), np.zeros((40, 3))
    for i, c, r in zip(rows, cols, rewards, strict=True):
        for j in range(40):
            if i in nbr[j]:
                want_n[j, c] += 1
                want_s[j, c] += r
    np.testing.assert_array_equal(post.count, want_n)
    np.testing.assert_array_equal(post.total, want_s)
    assert post.observe(np.empty(0, int), np.empty(0, int), np.empty(0)).size == 0


def test_weighted_answers_add_their_weights_and_copies_keep_their_own_counts():
    import copy

    rng = np.random.default_rng(2)
    nbr = nearest_rows(rng.normal(size=(30, 4)), 6)
    post = NeighbourPosterior(nbr, n_models=2)
    rows = np.array([4, 4, 4, 11, 29])
    cols = np.array([0, 1, 0, 1, 0])
    rewards = np.array([1.0, 0.25, 0.0, 1.0, 0.6])
    weights = np.array([1.0, 0.5, 2.0, 0.1, 1.0])
    twin = copy.deepcopy(post)
    post.observe(rows, cols, rewards, weights)
    want_n, want_s = np.zeros((30, 2)), np.zeros((30, 2))
    for i, c, r, w in zip(rows, cols, rewards, weights, strict=True):
        for j in range(30):
            if i in nbr[j]:
                want_n[j, c] += w
                want_s[j, c] += w * r
    np.testing.assert_allclose(post.count, want_n, rtol=0, atol=1e-12)
    np.testing.assert_allclose(post.total, want_s, rtol=0, atol=1e-12)
    assert not twin.count.any() and not twin.total.any()  # the copy saw none of it
    twin.observe(rows[:1], cols[:1], rewards[:1])
    assert twin.count.sum() == sum(4 in nbr[j] for j in range(30))


def test_posterior_is_prior_worth_prior_n_answers_plus_observed_ones():
    nbr = np.tile(np.arange(4), (4, 1))  # every row neighbours every row
    post = NeighbourPosterior(nbr, n_models=2)
    prior = np.full(4, 0.8)
    np.testing.assert_allclose(post.posterior(0, prior, 20.0), 0.8)  # nothing seen yet
    post.observe(np.arange(4).repeat(5), np.zeros(20, int), np.zeros(20))
    # 20 answers, all wrong, against a prior worth 20 answers at 0.8: halfway.
    np.testing.assert_allclose(post.posterior(0, prior, 20.0), 0.4)
    np.testing.assert_allclose(post.posterior(1, prior, 20.0), 0.8)  # other model untouched
    post.forget(0)
    np.testing.assert_allclose(post.posterior(0, prior, 20.0), 0.8)


def test_routing_uses_the_posterior_and_a_reset_forgets_it():
    wl = make_workload(800)
    llms = infos(wl)
    pol = make_policy(wl, llms, online=True, uncertainty=False, penalty=False, update_every=4)
    assert pol._net_on is False  # the default critic needs no network
    view = idle_view(llms)
    row = int(wl.rows(SPLIT_TEST)[0])
    col = llms[0].model_col
    before = pol.route(query(wl, 0, row), view).terms["quality_pred"][0]
    for i in range(8):
        pol.feedback(Feedback(i, row, llms[0].name, 0.0, float(i)))
    k = pol._online_prior_n
    want = k * pol.q_hat[row, col] / (k + 8)  # 8 wrong answers of the query itself
    after = pol.route(query(wl, 1, row), view).terms["quality_pred"][0]
    assert after == pytest.approx(want) and after < before
    pol.set_tradeoff(3.0, reset=False)  # a sweep point keeping what was learned
    assert pol.route(query(wl, 2, row), view).terms["quality_pred"][0] == pytest.approx(want)
    pol.set_tradeoff(3.0)  # reset: back to the offline prediction
    assert pol.route(query(wl, 3, row), view).terms["quality_pred"][0] == pytest.approx(before)


def test_the_critics_neighbourhood_is_200_rows_unless_set():
    wl = make_workload(800)
    llms = infos(wl)
    pol = make_policy(wl, llms, online=True, knn_k=7)
    # Each row's 200 most similar workload rows, whatever the kNN's k.
    assert pol._nbr_lists.shape == (len(wl.features), 200)
    np.testing.assert_array_equal(np.sort(pol._nbr_lists, axis=1),
                                  np.sort(nearest_rows(pol._x, 200), axis=1))
    assert make_policy(wl, llms, online=True, knn_k=7, online_neighbours=5)._nbr_lists.shape[1] == 5
    # The imputation's correlation stays over the kNN's k fit rows.
    assert pol._correlation.neighbours.shape[1] == 7
    # A workload of fewer rows: every row is in every neighbourhood.
    small = make_workload(150)
    pol = make_policy(small, infos(small), online=True, knn_k=7)
    assert pol._nbr_lists.shape == (150, 150)
    assert (np.sort(pol._nbr_lists, axis=1) == np.arange(150)).all()


def test_an_added_llm_learns_against_a_prior_worth_its_warm_start_rows():
    wl = make_workload(800)
    llms = infos(wl)
    pol = make_policy(wl, llms[:2], online=True, warm_start_n=4, update_every=1)
    pol.on_llm_added(llms[2])
    col = llms[2].model_col
    row = int(wl.rows(SPLIT_TEST)[0])
    pol.feedback(Feedback(0, row, llms[2].name, 1.0, 0.0))
    # One right answer against a prior worth 4: q = (4 q_off + 1) / 5 at the row itself.
    assert pol._q_live[row, col] == pytest.approx((4 * pol.q_hat[row, col] + 1) / 5)


def test_a_decisions_recorded_quality_does_not_move_with_later_feedback():
    wl = make_workload(800)
    llms = infos(wl)
    pol = make_policy(wl, llms, online=True, update_every=1)
    row = int(wl.rows(SPLIT_TEST)[0])
    dec = pol.route(query(wl, 0, row), idle_view(llms))
    held = dec.terms["quality_pred"].copy()
    pol.feedback(Feedback(0, row, llms[0].name, 0.0, 0.0))
    np.testing.assert_array_equal(dec.terms["quality_pred"], held)


def test_both_uses_the_ridge_corrected_prediction_as_the_posteriors_prior():
    wl = make_workload(800)
    llms = infos(wl)
    pol = make_policy(wl, llms, online=True, online_critic_kind="both", update_every=4,
                      uncertainty=False)
    row = int(wl.rows(SPLIT_TEST)[0])
    col = llms[0].model_col
    for i in range(8):  # 8 wrong answers of the query itself
        pol.feedback(Feedback(i, row, llms[0].name, 0.0, float(i)))
    k = pol._online_prior_n
    delta = float(pol._net.correction(np.array([col]), pol._z[row])[0])
    assert delta < 0  # the ridge learned that the offline prediction was too high
    # Posterior mean with prior (offline + ridge correction) worth k answers, 8 zeros seen.
    want = k * (pol.q_hat[row, col] + delta) / (k + 8)
    got = pol.route(query(wl, 9, row), idle_view(llms)).terms["quality_pred"][0]
    assert got == pytest.approx(want)
    # Not the sum of both critics' pulls (the same 8 answers counted twice): the ridge's
    # correction enters with the prior's weight k / (k + 8) only.
    posterior_alone = k * pol.q_hat[row, col] / (k + 8)
    assert got - posterior_alone == pytest.approx(delta * k / (k + 8))
    assert got > posterior_alone + delta


def test_prices_in_force_survive_a_reset_of_what_was_learned():
    wl = make_workload(800)
    llms = infos(wl)
    pol = make_policy(wl, llms, online=True)
    cheap = llms[0]
    dear_now = type(cheap)(cheap.name, cheap.model, cheap.model_col, 50.0, 50.0)
    pol.on_price_changed(dear_now)
    pol.set_tradeoff(3.0)  # reset
    assert pol._info[cheap.name].price_in_per_mtok == 50.0
    pol.feedback(Feedback(0, int(wl.rows(SPLIT_TEST)[0]), cheap.name, 1.0, 0.0))
    pol.apply_feedback()  # binds from the known deployments: at the new price
    assert pol._pin[pol._names.index(cheap.name)] == 50.0


def test_nearest_rows_among_candidates_match_brute_force(monkeypatch):
    monkeypatch.setattr(neighbours, "BLOCK_ENTRIES", 5 * 20)  # 5-row blocks
    x = np.random.default_rng(2).normal(size=(30, 4))
    among = np.array([1, 4, 7, 8, 12, 15, 16, 20, 22, 23, 25, 27, 28, 29, 3, 9, 10, 11, 0, 2])
    got = nearest_rows(x, 6, among=among)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn[among].T
    assert [set(r.tolist()) for r in got] == [
        set(np.argsort(-sim[i], kind="stable")[:6].tolist()) for i in range(30)]
    assert nearest_rows(x, 50, among=among[:3]).tolist() == [[0, 1, 2]] * 30


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("table", [True, False])
def test_answer_correlation_is_the_neighbours_mean_weighted_by_the_rewards_likelihood(
        monkeypatch, soft, table):
    monkeypatch.setattr(neighbours, "BLOCK_ENTRIES", 3 * 4 * 3)  # 3-row blocks of the tables
    rng = np.random.default_rng(3)
    answers = rng.random((12, 3)) if soft else (rng.random((12, 3)) < 0.6).astype(float)
    nbr = np.stack([rng.choice(12, 4, replace=False) for _ in range(10)])
    # 10 rows x 3 columns x (3 + 1) entries x 8 bytes: the table, or one byte short of it.
    corr = neighbours.AnswerCorrelation(nbr, answers, prior_n=2.0,
                                        table_bytes=960 if table else 959)
    assert (corr.products is not None) == table
    rows = np.array([0, 4, 4, 9, 7])
    observed = np.array([1, 0, 2, 1, 0])
    reward = np.array([1.0, 0.0, 1.0, 0.0, 0.5])
    prior = rng.random((5, 3))
    got, worth = corr.expected(rows, observed, reward, prior)
    for b, (r, lo, y) in enumerate(zip(rows, observed, reward, strict=True)):
        a = answers[nbr[r]]
        w = y * a[:, lo] + (1 - y) * (1 - a[:, lo])  # likelihood of y under each neighbour
        want = (2.0 * prior[b] + w @ a) / (2.0 + w.sum())
        want[lo] = y
        np.testing.assert_allclose(got[b], want, rtol=1e-12)
        with np.errstate(invalid="ignore", divide="ignore"):
            r2 = np.nan_to_num(np.corrcoef(a.T)[lo] ** 2)  # no variance: worth nothing
        r2[lo] = 1.0
        np.testing.assert_allclose(worth[b], r2, rtol=1e-9, atol=1e-12)


def test_observations_count_with_their_weights():
    nbr = np.tile(np.arange(4), (4, 1))
    post = NeighbourPosterior(nbr, n_models=2)
    post.observe(np.array([0, 1]), np.array([0, 0]), np.array([1.0, 0.5]), np.array([1.0, 0.25]))
    np.testing.assert_allclose(post.count[:, 0], 1.25)
    np.testing.assert_allclose(post.total[:, 0], 1.125)
    # prior 0.5 worth 2 answers, 1.25 answers seen adding up to 1.125
    np.testing.assert_allclose(post.posterior(0, np.full(4, 0.5), 2.0), (1.0 + 1.125) / 3.25)
    assert post.count[:, 1].sum() == 0


def correlated_workload(n: int = 800):
    """Two LLMs with the same answer to every query (one per query, either way at random):
    one's reward is the other's answer."""
    rng = np.random.default_rng(4)
    shared = (rng.random(n) < 0.5).astype(float)
    p = np.column_stack([shared, shared, np.full(n, 0.9)])
    return make_workload(n, p=p)


@pytest.mark.parametrize("worth", ["one", "r2"])
def test_a_reward_moves_the_estimates_of_the_llms_not_chosen_and_the_switch_turns_it_off(
        worth):
    wl = correlated_workload()
    llms = infos(wl)
    row = int(wl.rows(SPLIT_TEST)[0])
    cols = [x.model_col for x in llms]
    live = {}
    for impute in (True, False):
        pol = make_policy(wl, llms, online=True, update_every=1, online_impute=impute,
                          online_impute_worth=worth)
        before = pol._q_live[row].copy()
        pol.feedback(Feedback(0, row, llms[0].name, 0.0, 0.0))
        live[impute] = pol._q_live[row] - before
    # Where llm 0 is wrong, the query's neighbours say llm 1 is wrong too: its estimate drops
    # almost as far as llm 0's own (the imputed answer is shrunk towards the offline
    # prediction by 5 answers against the dozens of neighbours agreeing with the reward, and
    # worth the squared correlation, 1 here). llm 2's answers do not depend on llm 0's: it
    # barely moves.
    drop = -live[True]
    assert drop[cols[0]] == pytest.approx(-live[False][cols[0]])
    assert drop[cols[0]] > 0
    assert 0.8 * drop[cols[0]] < drop[cols[1]] <= drop[cols[0]]
    assert abs(drop[cols[2]]) < 0.2 * drop[cols[0]]
    if worth == "r2":
        # Worth the squared correlation, about 1/k for independent answers over k neighbours.
        assert abs(drop[cols[2]]) < 0.01 * drop[cols[0]]
    assert live[False][cols[1]] == 0.0 and live[False][cols[2]] == 0.0


def test_answer_correlation_covers_only_llms_fitted_on_every_fit_row():
    wl = correlated_workload()
    llms = infos(wl)
    pol = make_policy(wl, llms[:2], online=True, warm_start_n=4, update_every=1)
    pol.on_llm_added(llms[2])  # fitted on 4 warm-start rows: its answers elsewhere unknown
    row = int(wl.rows(SPLIT_TEST)[0])
    new = llms[2].model_col
    before = pol._q_live[row].copy()
    pol.feedback(Feedback(0, row, llms[0].name, 0.0, 0.0))
    assert pol._q_live[row, new] == before[new]  # nothing imputed to it
    moved = pol._q_live[row].copy()
    pol.feedback(Feedback(1, row, llms[2].name, 0.0, 1.0))
    changed = np.flatnonzero(pol._q_live[row] != moved)
    assert changed.tolist() == [new]  # nor from it
    pol.refit_columns({llms[0].model_col: np.arange(10)})
    assert pol._correlation is None  # its tables hold answers the refit says are unknown


@pytest.mark.parametrize("kept", [0, 2])
def test_queries_of_a_task_family_the_fit_rows_lack_impute_nothing(kept):
    wl = correlated_workload()
    # Family 1 keeps `kept` training rows: its queries' nearest fit rows are of family 0.
    unseen = (wl.task == 1) & (wl.split != SPLIT_TEST)
    unseen[np.flatnonzero(unseen)[:kept]] = False
    wl = dataclasses.replace(wl, split=np.where(unseen, SPLIT_TEST, wl.split).astype(np.int8))
    llms = infos(wl)
    pol = make_policy(wl, llms, online=True, update_every=1)
    other = llms[1].model_col
    for family, moves in ((1, False), (0, True)):
        row = int(np.flatnonzero((wl.split == SPLIT_TEST) & (wl.task == family))[0])
        before = pol._q_live[:, other].copy()
        pol.feedback(Feedback(family, row, llms[0].name, 0.0, float(family)))
        assert (not np.array_equal(pol._q_live[:, other], before)) == moves


def test_an_imputed_answer_worth_r2_counts_its_squared_correlation():
    wl = correlated_workload()
    llms = infos(wl)
    pol = make_policy(wl, llms, online=True, update_every=10, online_impute_worth="r2")
    row = int(wl.rows(SPLIT_TEST)[0])
    for i in range(10):
        pol.feedback(Feedback(i, row, llms[0].name, 0.0, float(i)))
    holders = np.flatnonzero((pol._nbr_lists == row).any(axis=1))
    answers = wl.quality[pol._fit_rows][pol._correlation.neighbours[row]]
    r2 = np.corrcoef(answers.T.astype(np.float64))[0] ** 2  # llm 0 against each
    for col in (1, 2):
        got = pol._posterior.count[holders, llms[col].model_col]
        np.testing.assert_allclose(got, 10 * r2[col], rtol=1e-9)
    assert r2[1] > 0.9 > 0.1 > r2[2]  # llm 1 answers as llm 0 does; llm 2 independently


def test_with_fit_on_train_imputation_never_reads_validation_answers():
    wl = correlated_workload()
    llms = infos(wl)
    valid = wl.split == SPLIT_VALID
    flipped = dataclasses.replace(
        wl, quality=np.where(valid[:, None], 1.0 - wl.quality, wl.quality).astype(np.float32))
    row = int(wl.rows(SPLIT_TEST)[0])
    live = []
    for w in (wl, flipped):
        pol = make_policy(w, llms, online=True, update_every=1, fit_on="train")
        pol.feedback(Feedback(0, row, llms[0].name, 0.0, 0.0))
        live.append(pol._q_live.copy())
    np.testing.assert_array_equal(live[0], live[1])
