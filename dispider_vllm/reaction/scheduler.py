"""vLLM's scheduler behind the decision gate: each engine step first waits while the sidecar decides closed clips.

vLLM builds its scheduler in the engine-core process from ``SchedulerConfig.scheduler_cls``; ``gated_scheduler``
is given there in its place. It picks vLLM's own class (``AsyncScheduler`` when vLLM chose async scheduling,
``Scheduler`` otherwise) and wraps its ``schedule``. The gate's name and its per-step limit come through the
environment, which the engine-core process inherits from the server (``ReactionEngine.start``).
"""

from __future__ import annotations

import logging
import os

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from dispider_vllm.decision_gate import DecisionGate

log = logging.getLogger(__name__)

GATE_ENV = "DISPIDER_DECISION_GATE"  # the gate's shared-memory name
LIMIT_ENV = "DISPIDER_DECISION_GATE_MS"  # the longest a step waits for it


class _GatedSchedule:
    """``schedule`` waits at the gate first (a mixin over vLLM's scheduler classes)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._gate = DecisionGate.attach(os.environ[GATE_ENV])
        self._gate_limit_s = float(os.environ[LIMIT_ENV]) / 1000
        log.info("reaction steps wait up to %.0f ms while the sidecar decides closed clips", self._gate_limit_s * 1000)

    def schedule(self, *args, **kwargs):
        self._gate.wait_while_held(self._gate_limit_s)
        return super().schedule(*args, **kwargs)


class GatedScheduler(_GatedSchedule, Scheduler):
    pass


class GatedAsyncScheduler(_GatedSchedule, AsyncScheduler):
    pass


def gated_scheduler(*args, vllm_config, **kwargs):
    """vLLM's scheduler for this configuration, behind the gate (``scheduler_cls`` calls this with its arguments)."""
    gated = GatedAsyncScheduler if vllm_config.scheduler_config.async_scheduling else GatedScheduler
    return gated(*args, vllm_config=vllm_config, **kwargs)
