"""A token bucket, the one rate-limiting rule the relay uses.

Used twice: for the rate of accepted connections (derper's
``--accept-connection-limit``/``--accept-connection-burst``) and for each
client's received bytes (announced to the client in ServerInfo).  Time is
passed in, so the bucket is pure and testable without sleeping.
"""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``."""

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError(f"token bucket needs a positive rate and burst, got {rate}, {burst}")
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._stamp = now

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._stamp)
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        self._stamp = now

    def try_take(self, amount: float, now: float) -> bool:
        """Take ``amount`` tokens if they are there; report whether we did."""
        self._refill(now)
        if self._tokens >= amount:
            self._tokens -= amount
            return True
        return False

    def take_debt(self, amount: float, now: float) -> float:
        """Take ``amount`` tokens even into debt; return seconds until the debt is repaid.

        The receive limiter reads a frame first and pauses the socket after,
        so a frame is never split; the debt is the time to stay paused.
        """
        self._refill(now)
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate
