"""Per-tenant quotas: sessions open at once, frames per second, reaction tokens per minute.

Rates are token buckets that refill continuously. A bucket may run into debt: a push of more frames than the
bucket holds is taken when the bucket is full, and an answer's tokens are counted as they are generated even
past the budget (running answers finish), so over time a tenant never gets more than its rate.

- sessions: ``max_sessions`` live sessions and chat completions open at once (429 ``too_many_sessions``);
- frames: ``frames_per_second`` over all of a tenant's sessions, bucket of ``frame_burst`` (429
  ``frame_rate_exceeded``); an encoded video chunk costs its frame count (duration x frame rate from its
  header, a full bucket when the header does not say); a chat completion pays for its whole video up front;
- tokens: ``tokens_per_minute`` generated reaction tokens, bucket of one minute's worth. A new answer starts only
  while at least one token is left; otherwise its trigger is skipped and the session gets an ``error`` event
  (``token_quota_exceeded``); a new request for a session is not refused for it.

Every refusal carries the seconds until the quota allows it again (``Retry-After``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from serve.errors import APIError, rate_limited
from serve.tenants import Tenant

SESSION_RETRY_AFTER_S = 5.0  # a session's end cannot be foreseen: a short, polite wait
Clock = Callable[[], float]


class TokenBucket:
    """``size`` tokens at most, refilled at ``rate_per_s``; the level may go below zero (debt)."""

    def __init__(self, rate_per_s: float, size: float, *, clock: Clock = time.monotonic) -> None:
        if rate_per_s <= 0 or size <= 0:
            raise ValueError("a token bucket needs a rate and a size > 0")
        self.rate_per_s, self.size = rate_per_s, size
        self._clock = clock
        self._level = size
        self._updated = clock()

    def level(self) -> float:
        now = self._clock()
        self._level = min(self.size, self._level + (now - self._updated) * self.rate_per_s)
        self._updated = now
        return self._level

    def seconds_until(self, amount: float) -> float:
        """How long until the bucket holds ``amount`` (capped at its size); 0 when it does now."""
        missing = min(amount, self.size) - self.level()
        return max(0.0, missing / self.rate_per_s)

    def take(self, amount: float) -> float:
        """Take ``amount`` when the bucket holds it (or is full, for more than it can hold): return 0.0.
        Otherwise take nothing and return the seconds to wait."""
        wait = self.seconds_until(amount)
        if wait == 0.0:
            self._level -= amount
        return wait

    def spend(self, amount: float) -> None:
        """Count use that already happened, into debt if need be."""
        self.level()
        self._level -= amount


class TenantUsage:
    """One tenant's use of its quotas. Every check raises a 429 :class:`APIError` with ``retry_after_s``."""

    def __init__(
        self, tenant: Tenant, *, clock: Clock = time.monotonic, on_refusal: Callable[[str, str], None] | None = None
    ) -> None:
        self.tenant = tenant
        quotas = tenant.quotas
        self._frames = (
            TokenBucket(quotas.frames_per_second, quotas.frame_bucket_size, clock=clock)
            if quotas.frames_per_second else None
        )
        self._tokens = (
            TokenBucket(quotas.tokens_per_minute / 60.0, quotas.tokens_per_minute, clock=clock)
            if quotas.tokens_per_minute else None
        )
        self._on_refusal = on_refusal or (lambda tenant, quota: None)

    @property
    def name(self) -> str:
        return self.tenant.name

    @property
    def priority(self) -> int:
        return self.tenant.priority

    def check_sessions(self, open_now: int) -> None:
        limit = self.tenant.quotas.max_sessions
        if limit is not None and open_now >= limit:
            raise self._refused("sessions", rate_limited(
                f"tenant {self.name!r} has its maximum of {limit} sessions open; close one or try later",
                "too_many_sessions", SESSION_RETRY_AFTER_S))

    def take_frames(self, count: int) -> None:
        if self._frames is None or count <= 0:
            return
        wait = self._frames.take(count)
        if wait > 0:
            raise self._refused("frames", rate_limited(
                f"tenant {self.name!r} is over its rate of {self.tenant.quotas.frames_per_second:g} frames/s "
                f"({count} frames refused)", "frame_rate_exceeded", wait))

    def take_video_frames(self, duration_s: float | None, fps: float | None) -> None:
        """An encoded video costs its frame count from its header; a full bucket when the header does not say."""
        if self._frames is not None:
            self.take_frames(frames_in_video(duration_s, fps, fallback=math.ceil(self._frames.size)))

    def check_answer(self) -> None:
        """Whether a new answer may start: at least one token of the minute's budget left."""
        if self._tokens is None:
            return
        wait = self._tokens.seconds_until(1)
        if wait > 0:
            raise self._refused("tokens", rate_limited(
                f"tenant {self.name!r} used its {self.tenant.quotas.tokens_per_minute} reaction tokens per minute: "
                "this answer is skipped", "token_quota_exceeded", wait))

    def spend_tokens(self, count: int) -> None:
        if self._tokens is not None and count > 0:
            self._tokens.spend(count)

    def _refused(self, quota: str, error: APIError) -> APIError:
        self._on_refusal(self.name, quota)
        return error


class QuotaBook:
    """The usage of every tenant, made on first use."""

    def __init__(self, *, clock: Clock = time.monotonic, on_refusal: Callable[[str, str], None] | None = None) -> None:
        self._clock, self._on_refusal = clock, on_refusal
        self._usage: dict[str, TenantUsage] = {}

    def usage(self, tenant: Tenant) -> TenantUsage:
        usage = self._usage.get(tenant.name)
        if usage is None:
            usage = self._usage[tenant.name] = TenantUsage(tenant, clock=self._clock, on_refusal=self._on_refusal)
        return usage


def frames_in_video(duration_s: float | None, fps: float | None, fallback: int) -> int:
    """The frame count a video header implies; ``fallback`` when it does not say."""
    if not duration_s or not fps:
        return fallback
    return max(1, math.ceil(duration_s * fps))
