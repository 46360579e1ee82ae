"""The supervisor's rules, on real trio: optional components come back, vital ones stop the daemon in one line."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from edgetrio.daemon.supervisor import Supervisor, VitalFailure


async def test_an_optional_component_is_restarted_and_its_error_kept(autojump_clock: trio.testing.MockClock) -> None:
    """On trio's mock clock (time jumps when every task waits): the restarts and their backoff are exact, not raced
    against a real clock."""
    supervisor = Supervisor()
    runs = []
    failing = trio.Event()

    async def flaky() -> None:
        runs.append(trio.current_time())
        if len(runs) < 4:
            raise OSError("port unplugged")
        failing.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: supervisor.keep("serial:/dev/ttyUSB0", flaky, base_delay=10))
        await failing.wait()
        state = supervisor.states()[0]
        assert state["state"] == "running" and state["restarts"] == 3
        assert state["last_error"] == "OSError: port unplugged"
        gaps = [b - a for a, b in itertools.pairwise(runs)]
        assert all(0 <= gap <= 10 * 2**i for i, gap in enumerate(gaps)), gaps  # 0..base, 0..2*base, 0..4*base
        nursery.cancel_scope.cancel()


async def test_a_vital_component_stops_everything_with_one_line() -> None:
    supervisor = Supervisor()

    async def store() -> None:
        raise RuntimeError("disk I/O error")

    with pytest.raises(VitalFailure, match=r"^store failed: RuntimeError: disk I/O error$"):
        await supervisor.keep("store", store, vital=True)
    assert supervisor.states()[0]["state"] == "failed"
