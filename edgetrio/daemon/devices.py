"""Device services for transports other than MQTT: serial boards speaking JSON lines (`edgetrio daemon --serial`).

A line is `{"ch": CHANNEL, "msg": PAYLOAD}`, the channel being what follows `edgetrio/{id}/` on MQTT. The board first
sends `{"ch": "hello", "msg": {"id", "password"}}`; the credential is checked as the broker checks it. From then on the
board's lines enter the same hand-off as the broker's messages (so ingest, acks, twin and commands are the same), and
what the gateway sends to the device is written to its line. A board unplugged and plugged back is opened again.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import serial
import trio

from edgetrio import wire
from edgetrio.daemon.broker import BrokerLink, BusEvent, Credentials
from edgetrio.daemon.topics import device_topic

log = logging.getLogger("edgetrio.serial")
MAX_LINE = 64 * 1024


class SerialDevice:
    """A board on a serial port (JSON lines, no Wi-Fi): bridged onto the bus as if it spoke MQTT, its login checked
    as a network device's is."""

    def __init__(self, port: str, link: BrokerLink, credentials: Credentials, baud: int = 115200) -> None:
        self.port = port
        self.link = link
        self.credentials = credentials
        self.baud = baud
        self.device: str | None = None
        self._rdev = 0

    async def run(self) -> None:
        """Serve the port until cancelled, reopening it whenever it goes away."""
        reported = False
        while True:
            try:
                handle = serial.Serial(self.port, self.baud, timeout=0)
            except (serial.SerialException, OSError) as exc:
                if not reported:
                    log.warning("serial port %s unavailable (%s); retrying", self.port, exc)
                    reported = True
                await trio.sleep(1)
                continue
            reported = False
            log.info("serial port %s open", self.port)
            stream = trio.lowlevel.FdStream(os.dup(handle.fileno()))
            self._rdev = os.fstat(handle.fileno()).st_rdev
            try:
                await self._session(stream)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as group:
                log.warning("serial port %s lost: %r", self.port, group.exceptions[0])
            finally:
                self._detach()
                await stream.aclose()
                handle.close()
            await trio.sleep(1)

    def _still_there(self) -> bool:
        try:
            return os.stat(self.port).st_rdev == self._rdev
        except OSError:
            return False

    def _detach(self) -> None:
        if self.device is not None:
            self.link.sinks.pop(self.device, None)
            self.link.deliver(BusEvent("disconnected", self.device, self.device))
            self.device = None

    async def _session(self, stream: trio.lowlevel.FdStream) -> None:
        outgoing_send, outgoing = trio.open_memory_channel[bytes](1000)

        def sink(channel: str, payload: bytes) -> None:
            try:
                msg: Any = wire.loads(payload)
            except ValueError:
                msg = payload.decode("utf-8", "replace")
            try:
                outgoing_send.send_nowait(json.dumps({"ch": channel, "msg": msg}).encode() + b"\n")
            except trio.WouldBlock:
                self.link.dropped += 1  # a board that stopped reading: refuse rather than queue without bound

        async def writer() -> None:
            async for line in outgoing:
                await stream.send_all(line)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            buffer = b""
            while True:
                data = await stream.receive_some(4096)
                if not data:  # a hang-up: the port went away, or nobody is on the other end yet
                    if not self._still_there():
                        raise trio.BrokenResourceError("unplugged")
                    await trio.sleep(0.1)
                    continue
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    await self._line(line.strip(), sink, outgoing_send)
                if len(buffer) > MAX_LINE:
                    log.warning("serial port %s: line over %d bytes dropped", self.port, MAX_LINE)
                    self.link.counters_extra["serial_oversize"] += 1
                    buffer = b""

    async def _line(self, line: bytes, sink: Any, outgoing: trio.MemorySendChannel[bytes]) -> None:
        if not line:
            return
        try:
            message = wire.loads(line)
            channel, msg = message["ch"], message.get("msg")
            if not isinstance(channel, str):
                raise TypeError("ch must be a string")
        except (ValueError, KeyError, TypeError):
            self.link.counters_extra["serial_malformed"] += 1
            log.warning("serial port %s: malformed line dropped", self.port)
            return
        if channel == "hello":
            self._detach()
            hello = msg if isinstance(msg, dict) else {}
            device = str(hello.get("id", ""))
            password = hello.get("password")
            reason = self.credentials.check(device, password if isinstance(password, str) else None, device)
            if reason is not None:
                self.link.counters_extra["auth_refused"] += 1
                log.warning("serial port %s: refused %s", self.port, reason)
                await outgoing.send(json.dumps({"ch": "welcome", "msg": {"error": reason}}).encode() + b"\n")
                return
            self.device = device
            self.link.sinks[device] = sink
            await outgoing.send(b'{"ch": "welcome", "msg": {}}\n')
            self.link.deliver(BusEvent("connected", device, device))
            self.link.deliver(BusEvent("subscribed", device, device, device_topic(device, "#")))
            return
        if self.device is None:
            self.link.counters_extra["serial_before_hello"] += 1
            return
        payload = msg.encode() if isinstance(msg, str) else json.dumps(msg).encode()
        self.link.deliver(BusEvent("message", self.device, self.device, device_topic(self.device, channel), payload))
