"""Failed-login limiting per user name and per client address, with exponential back-off.

Policy (per key; a key is a user name or a client address, each with its own threshold):
- failures are counted while they keep coming: a failure more than `window_s` after the later of
  the previous failure and the end of the previous back-off starts the count again at 1;
- once a key has `k` counted failures (k = user_failures or address_failures), every attempt on it
  is refused, the right password included, until `backoff_s * 2**(failures - k)` seconds (at most
  `backoff_cap_s`) after its last failure; refused attempts are not checked and not counted;
- a successful login forgets the user name's count (not the address's: one valid account must not
  clear the counter of an address that is guessing at others).

The client address is the one the HTTP server saw (behind a reverse proxy: the proxy's, unless the
server is told to trust its forwarding header; docs/ui.md). Gradio calls the auth callable with
(name, password) only, so `ClientAddressMiddleware` puts the request's address in a context
variable that `client_address()` reads inside that call.

Memory is bounded: at most `max_keys` keys are tracked; expired keys go first, then the least
recently failed. Thread-safe (one lock; the password check runs outside it, with the attempt
reserved so that parallel guesses cannot all slip in under the limit).
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from vocab.errors import ConfigError

UNKNOWN_ADDRESS: Final = "?"  # no request in sight (direct calls): all share one address key
MAX_NAME_CHARS: Final = 128  # longer names share a key with their prefix (memory, audit size)
Scope = Literal["user", "address"]

_client: contextvars.ContextVar[str | None] = contextvars.ContextVar("fedsight_client_address",
                                                                      default=None)


@dataclass(frozen=True)
class LoginLimits:
    """user_failures / address_failures: failed logins before a user name / an address is refused
    (an address is higher: a hospital NAT puts many clinicians behind one address).
    window_s: a quiet gap this long forgets a key's failures. backoff_s: the first refusal period,
    doubled per further failure up to backoff_cap_s. max_keys: tracked names + addresses at most.
    """

    user_failures: int = 5
    address_failures: int = 20
    window_s: float = 900.0
    backoff_s: float = 30.0
    backoff_cap_s: float = 900.0
    max_keys: int = 10_000

    def __post_init__(self) -> None:
        for name in ("user_failures", "address_failures", "max_keys"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"login limit {name} must be an integer >= 1, got {v!r}")
        for name in ("window_s", "backoff_s", "backoff_cap_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < float("inf"):
                raise ConfigError(f"login limit {name} must be a positive number of seconds, "
                                  f"got {v!r}")
        if self.backoff_cap_s < self.backoff_s:
            raise ConfigError(f"login limit backoff_cap_s ({self.backoff_cap_s!r}) must be >= "
                              f"backoff_s ({self.backoff_s!r})")

    def threshold(self, scope: Scope) -> int:
        return self.user_failures if scope == "user" else self.address_failures

    def backoff(self, failures: int, scope: Scope) -> float:
        """Refusal period after `failures` counted failures (0 below the threshold)."""
        over = failures - self.threshold(scope)
        if over < 0:
            return 0.0
        return min(self.backoff_cap_s, self.backoff_s * 2.0 ** min(over, 64))


@dataclass(frozen=True)
class Attempt:
    """allowed: the password was checked; ok: it was right. When refused: scope names the key that
    refused (user name first), retry_after_s how long it stays refused, first_refusal whether
    this is the first refusal of that back-off (audit that one; the rest would flood the log)."""

    allowed: bool
    ok: bool
    scope: Scope | None = None
    retry_after_s: float = 0.0
    first_refusal: bool = False


class _Entry:
    __slots__ = ("blocked_until", "failures", "last", "pending", "refused")

    def __init__(self) -> None:
        self.failures = 0
        self.last = float("-inf")  # time of the last counted failure
        self.blocked_until = float("-inf")
        self.pending = 0  # attempts admitted whose password check has not returned yet
        self.refused = False  # a refusal was reported during the current back-off


class LoginLimiter:
    """`attempt(name, address, check)` applies the policy around `check()` (the password check)."""

    def __init__(self, limits: LoginLimits | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or LoginLimits()
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: OrderedDict[tuple[Scope, str], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def attempt(self, name: str, address: str | None, check: Callable[[], bool]) -> Attempt:
        keys: tuple[tuple[Scope, str], ...] = (("user", name[:MAX_NAME_CHARS]),
                                                ("address", address or UNKNOWN_ADDRESS))
        with self._lock:
            now = self._clock()
            for scope, k in keys:  # look, don't create: refusals must not grow the table
                e = self._keys.get((scope, k))
                if e is None:
                    continue
                if now < e.blocked_until:
                    first, e.refused = not e.refused, True
                    return Attempt(False, False, scope, e.blocked_until - now, first)
                if self._expired(e, now):
                    e.failures = 0
                # parallel attempts that could take the key past its threshold wait their turn
                if e.pending >= max(1, self.limits.threshold(scope) - e.failures):
                    return Attempt(False, False, scope, 1.0, False)
            entries = [self._entry(k) for k in keys]
            for e in entries:
                e.pending += 1
            self._evict(now)
        ok = False
        try:
            ok = bool(check())
        finally:
            with self._lock:
                now = self._clock()
                for (scope, _), e in zip(keys, entries, strict=True):
                    e.pending -= 1
                    if not ok:
                        self._fail(e, scope, now)
                if ok:
                    self._keys.pop(keys[0], None)
                self._evict(now)
        return Attempt(True, ok)

    def _entry(self, key: tuple[Scope, str]) -> _Entry:
        e = self._keys.get(key)
        if e is None:
            e = self._keys[key] = _Entry()
        self._keys.move_to_end(key)
        return e

    def _fail(self, e: _Entry, scope: Scope, now: float) -> None:
        if now - max(e.last, e.blocked_until) > self.limits.window_s:
            e.failures = 0
        e.failures += 1
        e.last = now
        e.blocked_until = now + self.limits.backoff(e.failures, scope)
        e.refused = False

    def _expired(self, e: _Entry, now: float) -> bool:
        return now - max(e.last, e.blocked_until) > self.limits.window_s

    def _evict(self, now: float) -> None:
        keys = self._keys
        while keys:  # oldest first: expired ones, and successes' leftovers, go before live ones
            k, e = next(iter(keys.items()))
            if e.pending or not (e.failures == 0 or self._expired(e, now)):
                break
            del keys[k]
        while len(keys) > self.limits.max_keys:
            victim = next((k for k, e in keys.items() if e.pending == 0), None)
            if victim is None:
                break
            del keys[victim]


class ClientAddressMiddleware:
    """Pure ASGI middleware: the request's client address, for `client_address()` (same task)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        token = _client.set(str(client[0]) if client else None)
        try:
            await self.app(scope, receive, send)
        finally:
            _client.reset(token)


def client_address() -> str | None:
    """The address of the HTTP request being handled (None outside ClientAddressMiddleware)."""
    return _client.get()
