"""The broker -> trio hand-off: batches, overload refusal, and the writer's per-operation isolation."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from edgetrio.daemon import store
from edgetrio.daemon.broker import BrokerLink, BusEvent
from edgetrio.identity import RegistryError
from edgetrio.writer import Writer


async def test_handoff_batches_and_refuses_past_the_bound() -> None:
    link = BrokerLink(max_pending=3)

    def broker_thread() -> None:
        for i in range(5):
            link.deliver(BusEvent("message", f"c{i}", None, "t", b"x"))

    await trio.to_thread.run_sync(broker_thread)
    batch = await link.receive_batch()
    assert [e.client_id for e in batch] == ["c0", "c1", "c2"]
    assert link.counters()["dropped_overload"] == 2
    # room again once taken
    await trio.to_thread.run_sync(lambda: link.deliver(BusEvent("message", "c5", None, "t", b"x")))
    assert [e.client_id for e in await link.receive_batch()] == ["c5"]
    link._close()
    assert await link.receive_batch() == []


async def test_writer_isolates_a_failing_operation_and_commits_the_rest(tmp_path: Path) -> None:
    db = store.open_db(tmp_path)
    writer = Writer(db)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        results: dict[str, object] = {}

        async def add(device_id: str) -> None:
            try:
                results[device_id] = await writer.write(lambda d: store.add_device(d, device_id))
            except RegistryError as exc:
                results[device_id] = exc

        async with trio.open_nursery() as batch:
            for device_id in ("a", "bad/id", "b"):
                batch.start_soon(add, device_id)
        await writer.close()
    assert isinstance(results["bad/id"], RegistryError)
    assert {d["id"] for d in store.list_devices(store.open_db(tmp_path))} == {"a", "b"}


def test_max_payload_and_port_are_checked() -> None:
    from edgetrio.daemon.config import ConfigError, build_config

    with pytest.raises(ConfigError):
        build_config({}, {"mqtt_port": 70000})
    with pytest.raises(ConfigError):
        build_config({"max_payload": 10}, {})
