# An asyncio MQTT 3.1.1 client for the edgetrio firmware.
# Every socket operation has a timeout; any failure closes the connection and raises, so the caller's reconnect
# loop is the one recovery path. QoS 1 publishes are retransmitted (DUP) until PUBACK. Incoming messages larger than
# max_in are skipped, not allocated (a MemoryError would otherwise kill the reader).
import asyncio
import struct
from micropython import const

CONNECT = const(0x10)
CONNACK = const(0x20)
PUBLISH = const(0x30)
PUBACK = const(0x40)
SUBSCRIBE = const(0x82)
SUBACK = const(0x90)
PINGREQ = const(0xC0)
PINGRESP = const(0xD0)
DISCONNECT = const(0xE0)


class MQTTError(Exception):
    pass


def _str(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _remaining(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


class MQTTClient:
    def __init__(self, client_id, host, port=1883, user=None, password=None, keepalive=15, will=None,
                 max_in=4096, timeout=10):
        self.client_id = client_id
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.keepalive = keepalive
        self.will = will  # (topic, message) sent by the broker if we vanish
        self.max_in = max_in
        self.timeout = timeout
        self.on_message = None  # callback(topic: str, payload: bytes)
        self.skipped = 0  # oversize incoming messages
        self._r = None
        self._w = None
        self._pid = 0
        self._acks = {}  # packet id -> asyncio.Event
        self._lock = asyncio.Lock()
        self.connected = False

    def _next_pid(self):
        self._pid = self._pid % 65535 + 1
        return self._pid

    async def _send(self, data):
        async with self._lock:
            w = self._w
            if w is None:
                raise MQTTError("not connected")
            w.write(data)
            await asyncio.wait_for(w.drain(), self.timeout)

    async def _read(self, n, timeout=None):
        r = self._r
        if r is None:
            raise MQTTError("not connected")
        return await asyncio.wait_for(r.readexactly(n), timeout or self.timeout)

    async def _packet(self):
        """Read one packet header and its length; returns (type byte, remaining length)."""
        first = (await self._read(1, self.keepalive * 2))[0]
        n = 0
        shift = 0
        while True:
            b = (await self._read(1))[0]
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift > 21:
                raise MQTTError("bad remaining length")
        return first, n

    async def connect(self):
        """Open the connection and wait for CONNACK; raises OSError or MQTTError on failure."""
        self._r, self._w = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.timeout)
        flags = 0x02  # clean session
        payload = _str(self.client_id)
        if self.will:
            flags |= 0x04 | 0x08 | 0x20  # will, will QoS 1, will retain
            payload += _str(self.will[0]) + _str(self.will[1])
        if self.user:
            flags |= 0x80
            payload += _str(self.user)
        if self.password:
            flags |= 0x40
            payload += _str(self.password)
        variable = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", self.keepalive)
        body = variable + payload
        try:
            await self._send(bytes([CONNECT]) + _remaining(len(body)) + body)
            first, n = await self._packet()
            data = await self._read(n)
        except Exception:
            await self.close()
            raise
        if first != CONNACK or n != 2 or data[1] != 0:
            await self.close()
            raise MQTTError("connection refused, code %d" % (data[1] if len(data) > 1 else -1))
        self.connected = True

    async def close(self):
        self.connected = False
        for ev in self._acks.values():
            ev.set()
        if self._w is not None:
            try:
                self._w.close()
                await self._w.wait_closed()
            except Exception:
                pass
        self._w = None
        self._r = None

    async def disconnect(self):
        if self.connected:
            try:
                await self._send(bytes([DISCONNECT, 0]))
            except Exception:
                pass
        await self.close()

    async def publish(self, topic, payload, qos=0, retries=3):
        """Publish; with qos=1 wait for PUBACK, resending with DUP. Raises on failure (connection is then closed)."""
        if isinstance(payload, str):
            payload = payload.encode()
        if not self.connected:
            raise MQTTError("not connected")
        body = _str(topic)
        pid = 0
        if qos:
            pid = self._next_pid()
            body += struct.pack("!H", pid)
            self._acks[pid] = asyncio.Event()
        header = PUBLISH | (qos << 1)
        try:
            for attempt in range(retries + 1):
                flags = header | (0x08 if attempt else 0)
                await self._send(bytes([flags]) + _remaining(len(body) + len(payload)) + body + payload)
                if not qos:
                    return
                try:
                    await asyncio.wait_for(self._acks[pid].wait(), self.timeout)
                except asyncio.TimeoutError:
                    continue
                if not self.connected:
                    break
                return
        finally:
            self._acks.pop(pid, None)
        await self.close()
        raise MQTTError("no PUBACK")

    async def subscribe(self, topics, qos=1):
        pid = self._next_pid()
        body = struct.pack("!H", pid)
        for t in topics:
            body += _str(t) + bytes([qos])
        self._acks[pid] = asyncio.Event()
        try:
            await self._send(bytes([SUBSCRIBE]) + _remaining(len(body)) + body)
            await asyncio.wait_for(self._acks[pid].wait(), self.timeout)
        finally:
            self._acks.pop(pid, None)
        if not self.connected:
            raise MQTTError("connection lost while subscribing")

    async def run(self):
        """Read packets until the connection fails; pings so the broker (and we) notice a dead link."""
        pinger = asyncio.create_task(self._ping())
        try:
            while True:
                first, n = await self._packet()
                kind = first & 0xF0
                if kind == PUBLISH:
                    await self._incoming(first, n)
                elif kind in (PUBACK, SUBACK):
                    data = await self._read(n)
                    ev = self._acks.get(struct.unpack("!H", data[:2])[0])
                    if ev:
                        ev.set()
                else:  # PINGRESP and anything else: read and drop
                    if n:
                        await self._read(n)
        finally:
            pinger.cancel()
            await self.close()

    async def _skip(self, n):
        while n:
            n -= len(await self._read(min(n, 256)))

    async def _incoming(self, first, n):
        qos = (first >> 1) & 3
        tlen = struct.unpack("!H", await self._read(2))[0]
        rest = n - 2 - tlen - (2 if qos else 0)
        if n > self.max_in:
            # skip it in small chunks instead of allocating it; still acknowledge it so it is not resent forever
            self.skipped += 1
            await self._skip(tlen)
            topic = None
        else:
            topic = (await self._read(tlen)).decode()
        pid = struct.unpack("!H", await self._read(2))[0] if qos else 0
        if topic is None:
            await self._skip(rest)
            payload = None
        else:
            payload = await self._read(rest) if rest else b""
        if qos:
            await self._send(bytes([PUBACK, 2]) + struct.pack("!H", pid))
        if topic is not None and self.on_message:
            try:
                self.on_message(topic, payload)
            except Exception as e:  # a bad message must not stop the reader
                print("on_message error:", e)

    async def _ping(self):
        while True:
            await asyncio.sleep(self.keepalive // 2 or 1)
            await self._send(bytes([PINGREQ, 0]))
