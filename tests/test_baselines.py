"""The learning-free baselines and the oracle when no deployment accepts a request."""

from __future__ import annotations

import pytest
from routing_workloads import learnable_workload, llm_infos, reference

from policies import registry
from reports.frontier import policy_context
from sim.offline import idle_view
from sim.types import SPLIT_TEST, Query

SIMPLE = ["random", "round_robin", "cheapest", "strongest", "least_loaded", "oracle"]


@pytest.mark.parametrize("name", SIMPLE)
def test_with_nothing_accepting_a_down_deployment_is_never_chosen(name):
    # `small` (the cheapest, and first) is down; `mid` and `large` are up with every slot
    # busy and full queues. The request is rejected whatever the choice, but for load at
    # an up deployment (its load_rejected count, its "overloaded" label), not as "down".
    # Before, cheapest/strongest/least_loaded took argmin/argmax over all-inf scores:
    # index 0, the down deployment.
    wl = learnable_workload()
    llms = llm_infos()
    pol = registry.create(name)
    pol.setup(policy_context(wl, llms, reference(llms), seed=0,
                             with_ground_truth=registry.get(name).uses_ground_truth))
    view = idle_view(llms)
    view.up[0] = False
    view.capacity[:] = 4
    view.busy[1:] = 4
    view.max_queue[:] = 10
    view.queue_len[1:] = 10
    for i in range(len(llms)):
        view.refresh(i)
    assert not view.accepting.any()
    picks = set()
    for i, row in enumerate(wl.rows(SPLIT_TEST)[:50]):
        q = Query(i, int(row), float(i), int(wl.input_tokens[row]), int(wl.task[row]))
        picks.add(pol.route(q, view).llm)
    assert picks and "small" not in picks
