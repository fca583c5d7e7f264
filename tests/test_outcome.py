"""What the driver does about what became of a call (step/outcome.py): one decision for the
crew and the windows alike, and one wording of a divergence."""

import math

import pytest

from distbp.step.outcome import Decision, Outcome, Stopped, Why, decide


@pytest.mark.parametrize("outcome, wanted, decision", [
    (Outcome.DONE, True, Decision.GO_ON),
    (Outcome.CALLED_OFF, True, Decision.GO_ON),  # another call of the window failed: it says why
    (Outcome.WORKER_LOST, True, Decision.REDO_SHARE),
    (Outcome.WORKER_LOST, False, Decision.REDO_SHARE),  # its slot must work again, wanted or not
    (Outcome.INPUTS_LOST, True, Decision.RECOVER_SERVERS),
    (Outcome.SERVER_LOST, True, Decision.RECOVER_SERVERS),
    (Outcome.DIVERGED, True, Decision.STOP_DIVERGED),
    (Outcome.BUG, True, Decision.RAISE),
    # a late copy whose share another worker did: what it met is not the run's
    (Outcome.INPUTS_LOST, False, Decision.GO_ON),
    (Outcome.DIVERGED, False, Decision.GO_ON),
    (Outcome.BUG, False, Decision.GO_ON),
])
def test_each_outcome_has_one_decision(outcome, wanted, decision):
    assert decide(outcome, wanted) is decision


def test_a_server_that_stopped_says_why_in_one_line():
    assert Stopped(Why.CALLED_OFF, 7).outcome is Outcome.CALLED_OFF
    assert Stopped(Why.LOSS, 7, math.inf).outcome is Stopped(Why.GRADIENT, 7).outcome is Outcome.DIVERGED
    assert Stopped(Why.LOSS, 7, math.nan).line() == "training diverged at step 7: the loss is nan"
    assert Stopped(Why.GRADIENT, 3).line() == ("training diverged at step 3: the summed gradient has NaN or inf "
                                               "(the server did not apply it)")
