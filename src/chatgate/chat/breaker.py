"""The upstream's circuit breaker: after a run of failed turns, new turns are refused at
once instead of queueing on an upstream that is down.

::

    closed ──(N failed turns in a row)──▶ open ──(cool-down passed)──▶ half_open
      ▲                                    ▲                              │
      └──────────(the probe answers)───────┼──────(the probe fails)───────┘

- **Closed**: turns go through. A turn that fails the way a down upstream fails (it cannot
  be reached, times out, answers 5xx, or breaks off before the first token) adds one to
  the count; any answer from the upstream, a 4xx refusal included, sets it back to 0.
- **Open**: every new turn is refused before it starts, as a retryable
  ``provider_unavailable`` with ``retry_after`` the rest of the cool-down. Nothing is sent
  upstream.
- **Half-open**: once the cool-down has passed, the next turn is the probe: one upstream
  request, without retries or fallback models. Other turns are refused meanwhile. The
  probe's answer closes the breaker; its failure opens it for another cool-down.

The breaker counts *turns*, not upstream requests: the chat service retries a turn and
tries its fallback models before the first token, and all of that is one failure here.
It judges a turn by how it starts (its first token, or the error that ended it before
one), so a turn that breaks off mid-answer has already counted as answered. The
provider's fallback models are the same upstream, so one breaker serves them all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Literal

from chatgate.chat.events import ChatError
from chatgate.providers.base import ProviderError, ProviderHTTPError

BreakerState = Literal["closed", "open", "half_open"]
BREAKER_STATES: tuple[BreakerState, ...] = ("closed", "open", "half_open")
#: What a turn refused during the probe is told to wait: the probe may end any moment.
PROBING_RETRY_AFTER_S = 1.0


def counts_against(exc: ProviderError) -> bool:
    """Whether ``exc`` is a failure of the upstream itself: unreachable, timed out, 5xx,
    broken off. A 4xx (an unknown model, a rate limit) and an answer withheld by the
    upstream's own rules show an upstream that is up."""
    if isinstance(exc, ProviderHTTPError):
        return exc.status >= 500
    return exc.retryable


class CircuitBreaker:
    """One upstream's breaker. ``failures`` of 0 turns it off: it stays closed."""

    def __init__(
        self, failures: int, cooldown_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        #: The time source: monotonic seconds (a test moves it past the cool-down).
        self.clock = clock
        self._failed = 0
        #: When it opened (or reopened after a failed probe); None while closed.
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return "closed"
        if self._probing or self.clock() - self._opened_at >= self.cooldown_s:
            return "half_open"
        return "open"

    def admit(self) -> Trial:
        """A new turn's trial, or the refusal when the breaker is open or probing."""
        if self._opened_at is None:
            return Trial(self, probe=False)
        left = self._opened_at + self.cooldown_s - self.clock()
        if self._probing or left > 0:
            retry_after = PROBING_RETRY_AFTER_S if self._probing else max(1.0, math.ceil(left))
            raise ChatError(
                "provider_unavailable",
                "the upstream is failing, so the gateway sends it no requests for now (circuit "
                f"breaker open after {self.failures} failed turns in a row, for {self.cooldown_s:g} s "
                f"at a time); try again in {retry_after:g} s",
                retryable=True,
                retry_after=retry_after,
            )
        self._probing = True
        return Trial(self, probe=True)

    def _settle(self, trial: Trial, failed: bool | None) -> None:
        """``failed`` None: the turn ended before telling anything (cancelled, crashed)."""
        if trial.probe:
            self._probing = False
            if failed is None:
                return  # the next turn probes instead
            self._opened_at = self.clock() if failed else None
            self._failed = 0
            return
        if self._opened_at is not None or failed is None:
            return  # admitted before it opened: only the probe decides now
        if not failed:
            self._failed = 0
            return
        self._failed += 1
        if self.failures and self._failed >= self.failures:
            self._opened_at = self.clock()


class Trial:
    """One turn as the breaker sees it; the first verdict counts, later ones do nothing."""

    __slots__ = ("_breaker", "_settled", "probe")

    def __init__(self, breaker: CircuitBreaker, *, probe: bool) -> None:
        self._breaker = breaker
        self.probe = probe
        self._settled = False

    def answered(self) -> None:
        """The upstream answered: a first token, or the end of an empty answer."""
        self._settle(failed=False)

    def failed(self, exc: ProviderError) -> None:
        """The turn failed before its first token with ``exc``."""
        self._settle(failed=counts_against(exc))

    def abandoned(self) -> None:
        """The turn ended without a verdict: cancelled, or the gateway failed."""
        self._settle(failed=None)

    def _settle(self, *, failed: bool | None) -> None:
        if not self._settled:
            self._settled = True
            self._breaker._settle(self, failed)
