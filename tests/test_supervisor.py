"""The supervisor's rules, on real trio: optional components come back, vital ones stop the daemon in one line."""

from __future__ import annotations

import pytest
import trio

from edgetrio.daemon.supervisor import Supervisor, VitalFailure


async def test_an_optional_component_is_restarted_and_its_error_kept() -> None:
    supervisor = Supervisor()
    runs = []

    async def flaky() -> None:
        runs.append(trio.current_time())
        if len(runs) < 3:
            raise OSError("port unplugged")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: supervisor.keep("serial:/dev/ttyUSB0", flaky, base_delay=0.01))
        with trio.fail_after(5):
            while len(runs) < 3:
                await trio.sleep(0.01)
        await trio.sleep(0.05)
        state = supervisor.states()[0]
        assert state["state"] == "running" and state["restarts"] == 2
        assert state["last_error"] == "OSError: port unplugged"
        nursery.cancel_scope.cancel()


async def test_a_vital_component_stops_everything_with_one_line() -> None:
    supervisor = Supervisor()

    async def store() -> None:
        raise RuntimeError("disk I/O error")

    with pytest.raises(VitalFailure, match=r"^store failed: RuntimeError: disk I/O error$"):
        await supervisor.keep("store", store, vital=True)
    assert supervisor.states()[0]["state"] == "failed"
