"""Failed-login back-off: the limiter against a replayed reference of the policy (Hypothesis),
its memory bound and thread safety, and the real Gradio server refusing the N+1th sign-in."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ui.login_limit import LoginLimiter, LoginLimits
from vocab.errors import ConfigError

LIMITS = LoginLimits(user_failures=2, address_failures=3, window_s=100.0, backoff_s=10.0,
                     backoff_cap_s=80.0, max_keys=10_000)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Reference:
    """The policy as stated in ui/login_limit.py, recomputed from each key's whole failure history
    at every attempt (no incremental counters, no eviction, no locking)."""

    def __init__(self, limits: LoginLimits) -> None:
        self.lim = limits
        self.history: dict[str, list[float]] = defaultdict(list)
        self.reported: set[tuple[str, float]] = set()

    def blocked_until(self, key: str, k: int) -> float:
        until = last = float("-inf")
        n = 0
        for t in self.history[key]:
            n = 1 if t - max(last, until) > self.lim.window_s else n + 1
            last = t
            until = t + (min(self.lim.backoff_cap_s, self.lim.backoff_s * 2 ** (n - k))
                         if n >= k else 0.0)
        return until

    def attempt(self, user: str, addr: str, ok: bool, now: float) -> tuple[bool, bool, str | None,
                                                                           float, bool]:
        for scope, key, k in (("user", "u:" + user, self.lim.user_failures),
                              ("address", "a:" + addr, self.lim.address_failures)):
            until = self.blocked_until(key, k)
            if now < until:
                first = (key, until) not in self.reported
                self.reported.add((key, until))
                return False, False, scope, until - now, first
        if ok:
            self.history["u:" + user] = []
        else:
            self.history["u:" + user].append(now)
            self.history["a:" + addr].append(now)
        return True, ok, None, 0.0, False


steps = st.lists(st.tuples(st.sampled_from(["ann", "bob", "cy"]), st.sampled_from(["10.0.0.1",
                 "10.0.0.2"]), st.booleans(), st.sampled_from([0.0, 0.5, 1.0, 5.0, 10.0, 20.0,
                 40.0, 80.0, 100.0, 101.0, 250.0])), max_size=60)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_limiter_matches_the_reference_policy(seq: list[tuple[str, str, bool, float]]) -> None:
    clock = Clock()
    lim, ref = LoginLimiter(LIMITS, clock), Reference(LIMITS)
    for user, addr, ok, dt in seq:
        clock.t += dt
        checked: list[bool] = []
        got = lim.attempt(user, addr, lambda ok=ok, seen=checked: seen.append(ok) or ok)
        want = ref.attempt(user, addr, ok, clock.t)
        assert (got.allowed, got.ok, got.scope, got.first_refusal) == (want[0], want[1], want[2],
                                                                      want[4])
        assert got.retry_after_s == pytest.approx(want[3])
        assert checked == ([ok] if want[0] else [])  # refused attempts never see the password


def test_right_password_refused_during_backoff_and_backoff_doubles() -> None:
    clock = Clock()
    lim = LoginLimiter(dataclasses.replace(LIMITS, address_failures=10), clock)
    assert not lim.attempt("ann", "a", lambda: False).ok
    assert not lim.attempt("ann", "a", lambda: False).ok  # 2nd failure: 10 s back-off
    r = lim.attempt("ann", "a", lambda: True)
    assert (r.allowed, r.scope, r.retry_after_s, r.first_refusal) == (False, "user", 10.0, True)
    assert not lim.attempt("ann", "b", lambda: True).first_refusal  # another address: still no
    clock.t += 10.0
    assert lim.attempt("ann", "a", lambda: False).allowed  # 3rd failure: 20 s
    clock.t += 19.9
    assert lim.attempt("ann", "a", lambda: True).retry_after_s == pytest.approx(0.1)
    clock.t += 0.1
    assert lim.attempt("ann", "a", lambda: True).ok  # success forgets the user name's count
    assert lim.attempt("ann", "a", lambda: False).allowed and \
        lim.attempt("ann", "a", lambda: True).ok  # one failure after a reset: no back-off


def test_address_limit_catches_guessing_across_user_names() -> None:
    clock = Clock()
    lim = LoginLimiter(LIMITS, clock)
    for user in ("ann", "bob", "cy"):
        assert lim.attempt(user, "10.9.9.9", lambda: False).allowed
    r = lim.attempt("dee", "10.9.9.9", lambda: True)
    assert (r.allowed, r.scope) == (False, "address")
    assert lim.attempt("dee", "10.0.0.1", lambda: True).ok  # other addresses unaffected


def test_backoff_is_capped_and_a_quiet_window_forgets() -> None:
    clock = Clock()
    lim = LoginLimiter(LIMITS, clock)
    lim.attempt("ann", "x", lambda: False)
    lim.attempt("ann", "x", lambda: False)
    waits = []
    for i in range(5):
        r = lim.attempt("ann", "y", lambda: True)
        waits.append(r.retry_after_s)
        clock.t += r.retry_after_s
        assert lim.attempt("ann", f"z{i}", lambda: False).allowed
    assert waits == [10.0, 20.0, 40.0, 80.0, 80.0]
    clock.t += 80.0 + 100.5  # quiet for longer than window_s after the last back-off ended
    lim.attempt("ann", "w", lambda: False)
    assert lim.attempt("ann", "w", lambda: True).ok  # count restarted at 1: below the threshold


def test_memory_is_bounded_and_expired_keys_go() -> None:
    clock = Clock()
    lim = LoginLimiter(LoginLimits(user_failures=2, address_failures=1000, max_keys=50), clock)
    for i in range(500):
        lim.attempt(f"user{i}", f"10.0.{i // 250}.{i % 250}", lambda: False)
        assert len(lim) <= 50
    clock.t += LoginLimits().window_s + 1
    lim.attempt("late", "10.1.1.1", lambda: False)
    assert len(lim) == 2  # everything else had expired


def test_parallel_guesses_cannot_slip_in_under_the_limit() -> None:
    lim = LoginLimiter(LoginLimits(user_failures=3, address_failures=1000))
    checks, start = [], threading.Barrier(16)

    def wrong() -> bool:
        checks.append(1)
        time.sleep(0.05)  # the password hash takes a while: the others arrive meanwhile
        return False

    def guess(i: int) -> None:
        start.wait()
        lim.attempt("ann", f"10.0.0.{i}", wrong)

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= len(checks) <= 3


@pytest.mark.parametrize("kw, field", [({"user_failures": 0}, "user_failures"),
                                       ({"backoff_s": -1.0}, "backoff_s"),
                                       ({"window_s": float("inf")}, "window_s"),
                                       ({"max_keys": True}, "max_keys"),
                                       ({"backoff_s": 60.0, "backoff_cap_s": 30.0},
                                        "backoff_cap_s")])
def test_limits_name_the_bad_field(kw: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        LoginLimits(**kw)  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.integration
def test_real_server_refuses_the_next_sign_in_then_accepts_after_backoff(service, tmp_path: Path
                                                                         ) -> None:
    import httpx

    from ui.app import build_app, serve
    from ui.config import UiConfig, hash_password
    from vocab import audit
    from vocab.audit import read_events

    backoff = 1.5
    cfg = UiConfig(port=_free_port(), users=(("dr_a", hash_password("right", 1000)),),
                   audit_log=tmp_path / "audit.jsonl",
                   login_limits=LoginLimits(user_failures=3, backoff_s=backoff))
    app = build_app(service, cfg)
    serve(app, cfg, block=False)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{cfg.port}", timeout=30) as c:
            def login(pw: str) -> httpx.Response:
                return c.post("/login", data={"username": "dr_a", "password": pw})

            assert [login("wrong").status_code for _ in range(3)] == [400, 400, 400]
            t_block = time.monotonic()
            r = login("right")  # the N+1th: refused, right password and all
            assert r.status_code == 429 and "try again" in r.json()["detail"]
            assert 1 <= int(r.headers["Retry-After"]) <= 2
            assert login("right").status_code == 429
            time.sleep(max(0.0, backoff - (time.monotonic() - t_block)) + 0.2)
            r = login("right")
            assert r.status_code == 200 and r.json() == {"success": True}
    finally:
        app.close()
    kinds = [(e.kind, e.actor, dict(e.data)) for e in read_events(tmp_path / "audit.jsonl")]
    assert kinds == [(audit.UI_LOGIN_FAILED, "dr_a", {})] * 3 + [
        (audit.UI_LOGIN_THROTTLED, "dr_a", {"scope": "user", "retry_after_s": 2}),
        (audit.UI_LOGIN, "dr_a", {})]
    assert "127.0.0.1" not in (tmp_path / "audit.jsonl").read_text()
