"""The decision gate's shared memory, as the sidecar and vLLM's scheduler use it from their own handles."""

import threading

import pytest

from dispider_vllm import decision_gate
from dispider_vllm.decision_gate import DecisionGate, GateCounts


@pytest.fixture
def gate():
    """The server's gate and the two processes' handles on it (attached by name, as the processes do)."""
    owner = DecisionGate.create()
    sidecar, reaction = DecisionGate.attach(owner.name), DecisionGate.attach(owner.name)
    yield owner, sidecar, reaction
    sidecar.close()
    reaction.close()
    owner.close()


def test_a_step_waits_while_closed_clips_wait_and_no_longer(gate):
    owner, sidecar, reaction = gate
    assert reaction.wait_while_held(5.0) == 0.0  # open: the step goes at once
    sidecar.hold(True)
    sidecar.hold(True)  # renewed while clips still wait: the same hold
    assert reaction.wait_while_held(0.05) >= 0.05  # held: the step waits its limit, then goes
    threading.Timer(0.1, sidecar.hold, (False,)).start()  # the clips decided while a step waits
    assert 0.1 <= reaction.wait_while_held(30.0) < 30.0
    assert reaction.wait_while_held(5.0) == 0.0
    counts = owner.counts()
    assert (counts.holds, counts.checks, counts.waits) == (1, 4, 2)
    assert 0.15 <= counts.waited_s < 30.05


def test_a_hold_the_sidecar_stops_renewing_ends_by_itself(gate, monkeypatch):
    """A sidecar that dies holding the gate does not stall the reaction beyond the hold's expiry."""
    owner, sidecar, reaction = gate
    monkeypatch.setattr(decision_gate, "HOLD_EXPIRY_S", 0.1)
    sidecar.hold(True)
    assert 0.0 < reaction.wait_while_held(30.0) < 30.0
    assert reaction.wait_while_held(30.0) == 0.0
    assert owner.counts() == GateCounts(holds=1, checks=2, waits=1, waited_s=pytest.approx(0.1, abs=0.1))
