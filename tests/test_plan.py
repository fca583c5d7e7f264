"""The plan of a step (step/plan.py): the shares cover the micro-batches once each, the lateness
rule, and where injected faults strike.  The crew and the windows both plan with it."""

import pytest

from distbp.faults import Action, parse
from distbp.lecture import tree
from distbp.step import plan


@pytest.mark.parametrize("n, idle", [(8, [0, 1, 2]), (2, [0, 1, 2]), (1, [4]), (13, [3, 1])])
def test_shares_cover_each_micro_batch_once_in_order(n, idle):
    shares = plan.shares(range(n), n, idle)
    assert [i for share in shares for i in share.ids] == list(range(n))
    assert [share.worker for share in shares] == idle[len(idle) - len(shares):]  # the last ones, if too few
    for share in shares:
        covered = [i for node in share.nodes for i in range(*tree.span(node, n))]
        assert covered == list(share.ids)  # each share's nodes are exactly its micro-batches
    # a piece of a step shared again (a backup) is cut from that piece alone
    again = plan.shares(shares[-1].ids, n, [7, 8])
    assert [i for share in again for i in share.ids] == list(shares[-1].ids)


def test_a_share_is_late_past_three_times_the_quickest_pace_plus_a_margin():
    assert plan.count(60, 8) == 8 and plan.count(64, 8) == 8
    assert plan.late_after(0.01, 4) == pytest.approx(plan.LATE_FACTOR * 0.04 + plan.LATE_MIN_S)
    assert plan.pace_of([0.02, 0.08], [2, 4]) == pytest.approx(0.01)
    assert not plan.any_late([0.01, 0.02], [4, 4])  # jitter
    assert plan.any_late([0.01, 0.5], [4, 4])


def test_injected_faults_strike_at_their_step_and_stalls_end_a_window():
    faults = parse("kill-worker:1@5,kill-server@7,delay-worker:0@9:2", 3)
    assert plan.strike(faults, "kill-worker", 5, 1) is Action.KILL
    assert plan.strike(faults, "kill-worker", 5, 0) is None and plan.strike(faults, "kill-server", 5) is None
    assert plan.strike(faults, "kill-server", 7) is Action.KILL
    assert plan.last_before_stall(faults, 3, 18) == 8  # the stalled step goes one by one
    assert plan.last_before_stall(faults, 10, 18) == 18
