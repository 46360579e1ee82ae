# An asyncio MQTT 3.1.1 client for the edgetrio firmware.
# Every socket operation has a timeout; any failure closes the connection and raises, so the caller's reconnect
# loop is the one recovery path (a half-written packet never stays queued for the next one). QoS 0 and 1 both ways;
# QoS 2 is refused up front. QoS 1 publishes are retransmitted (DUP) until PUBACK. Incoming messages larger than
# max_in are skipped, not allocated (a MemoryError would otherwise kill the reader), and reported to `on_oversize`.
import asyncio
import errno
import socket
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
MAX_TOPIC = const(256)  # longer incoming topics are skipped with their message
OVERSIZE_PEEK = const(96)  # bytes of a skipped payload kept for `on_oversize` (enough for a command's id)
CONNACK_CODES = {1: "unacceptable protocol version", 2: "client id rejected", 3: "server unavailable",
                 4: "bad user name or password", 5: "not authorized"}


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


def _qos(qos):
    if qos not in (0, 1):
        raise ValueError("QoS %r is not supported (0 or 1)" % (qos,))
    return qos


def connect_body(client_id, keepalive, will, user, password):
    """CONNECT's variable header and payload: a clean session, the will (QoS 1, retained) and the credentials."""
    flags = 0x02  # clean session
    payload = _str(client_id)
    if will:
        flags |= 0x04 | 0x08 | 0x20  # will, will QoS 1, will retain
        payload += _str(will[0]) + _str(will[1])
    if user:
        flags |= 0x80
        payload += _str(user)
    if password:
        flags |= 0x40
        payload += _str(password)
    return _str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload


class Packets:
    """The connection under the protocol: whole packets written one at a time, and read with a timeout each."""

    def __init__(self, timeout):
        self.timeout = timeout
        self._r = None
        self._w = None
        self._lock = asyncio.Lock()
        self._header = bytearray(5)  # the fixed header of each incoming packet, read into this (no allocation)

    async def close(self):
        await self._drop_stream()

    async def _drop_stream(self):
        w = self._w
        self._w = None
        self._r = None
        if w is not None:
            try:
                w.close()
                await w.wait_closed()
            except Exception:
                pass

    async def _send(self, data):
        async with self._lock:
            w = self._w
            if w is None:
                raise MQTTError("not connected")
            try:
                w.write(data)
                await asyncio.wait_for(w.drain(), self.timeout)
            except Exception as e:  # what was not written would go out in front of the next packet: end here
                await self.close()
                raise MQTTError("send failed: %r" % (e,))

    async def _read(self, n, timeout=None):
        r = self._r
        if r is None:
            raise MQTTError("not connected")
        return await asyncio.wait_for(r.readexactly(n), timeout or self.timeout)

    async def _packet(self, timeout):
        """Read one packet's fixed header; returns (type byte, remaining length)."""
        head = self._header
        head[0:2] = await self._read(2, timeout)
        n = head[1] & 0x7F
        shift = 7
        last = head[1]
        while last & 0x80:
            if shift > 21:
                raise MQTTError("bad remaining length")
            last = (await self._read(1))[0]
            n |= (last & 0x7F) << shift
            shift += 7
        return head[0], n

    async def _skip(self, n):
        while n:
            n -= len(await self._read(min(n, 256)))


class MQTTClient(Packets):
    def __init__(self, client_id, host, port=1883, user=None, password=None, keepalive=15, will=None,
                 max_in=4096, timeout=10):
        if password and not user:
            raise ValueError("MQTT needs a user name with a password")
        self.client_id = client_id
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.keepalive = keepalive
        self.will = will  # (topic, message) sent by the broker if we vanish; retained, as `online` is
        self.max_in = max_in
        self.on_message = None  # callback(topic: str, payload: bytes)
        self.on_oversize = None  # callback(topic: str, size: int, head: bytes): a message too large to take
        self.skipped = 0  # oversize incoming messages
        self._pid = 0
        self._acks = {}  # packet id -> asyncio.Event
        self._granted = {}  # SUBSCRIBE packet id -> the SUBACK's return codes
        self.connected = False
        Packets.__init__(self, timeout)

    def _next_pid(self):
        self._pid = self._pid % 65535 + 1
        return self._pid

    async def connect(self):
        """Open the connection and wait for CONNACK (within `timeout`); raises OSError or MQTTError on failure, and
        leaves no socket open behind it."""
        body = connect_body(self.client_id, self.keepalive, self.will, self.user, self.password)
        address = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)[0]
        sock = socket.socket(address[0], address[1], address[2])
        sock.setblocking(False)
        try:
            try:
                sock.connect(address[-1])
            except OSError as e:
                if e.errno != errno.EINPROGRESS:  # the connection completes while CONNECT is being written
                    raise
            stream = asyncio.StreamWriter(sock, {})
            self._r = self._w = stream
            await self._send(bytes([CONNECT]) + _remaining(len(body)) + body)
            first, n = await self._packet(self.timeout)
            data = await self._read(n)
        except Exception:
            await self.close()
            sock.close()
            raise
        if first != CONNACK or n != 2 or data[1] != 0:
            await self.close()
            code = data[1] if len(data) > 1 else -1
            raise MQTTError("connection refused: %s" % CONNACK_CODES.get(code, "code %d" % code))
        self.connected = True

    async def close(self):
        self.connected = False
        for ev in self._acks.values():
            ev.set()
        await self._drop_stream()

    async def disconnect(self):
        if self.connected:
            try:
                await self._send(bytes([DISCONNECT, 0]))
            except Exception:
                pass
        await self.close()

    async def publish(self, topic, payload, qos=0, retain=False, retries=3):
        """Publish `payload` (str, bytes, or a list of them sent as one); with qos=1 wait for PUBACK, resending with
        DUP. Raises on failure (connection is then closed)."""
        _qos(qos)
        # a payload in parts (a batch of readings as the buffer holds them) is copied into the packet part by part:
        # the packet is the one block the size of the message (one write: a header sent on its own would wait on
        # Nagle's algorithm for the rest)
        parts = [p.encode() if isinstance(p, str) else p for p in (payload if isinstance(payload, list) else [payload])]
        if not self.connected:
            raise MQTTError("not connected")
        t = topic.encode()
        size = 2 + len(t) + (2 if qos else 0) + sum(len(p) for p in parts)
        length = _remaining(size)
        packet = bytearray(1 + len(length) + size)
        packet[0] = PUBLISH | (qos << 1) | (1 if retain else 0)  # a retry sets the DUP bit in place
        i = 1 + len(length)
        packet[1:i] = length
        struct.pack_into("!H", packet, i, len(t))
        packet[i + 2:i + 2 + len(t)] = t
        i += 2 + len(t)
        pid = 0
        if qos:
            pid = self._next_pid()
            struct.pack_into("!H", packet, i, pid)
            i += 2
            self._acks[pid] = asyncio.Event()
        for part in parts:
            packet[i:i + len(part)] = part
            i += len(part)
        parts = []
        try:
            for attempt in range(retries + 1):
                if attempt:
                    packet[0] |= 0x08
                await self._send(packet)
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
        """Subscribe and wait for SUBACK; raises MQTTError naming a topic the broker refused."""
        _qos(qos)
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
        granted = self._granted.pop(pid, b"")
        if not self.connected:
            raise MQTTError("connection lost while subscribing")
        for topic, code in zip(topics, granted):
            if code == 0x80:
                raise MQTTError("subscription refused: %s" % topic)
        if len(granted) != len(topics):
            raise MQTTError("bad SUBACK")

    async def run(self):
        """Read packets until the connection fails; pings so the broker (and we) notice a dead link."""
        pinger = asyncio.create_task(self._ping())
        try:
            while True:
                # the broker answers a ping within the keepalive: twice that without a byte means the link is dead
                first, n = await self._packet(self.keepalive * 2)
                kind = first & 0xF0
                if kind == PUBLISH:
                    await self._incoming(first, n)
                elif kind in (PUBACK, SUBACK):
                    data = await self._read(n)
                    pid = struct.unpack("!H", data[:2])[0]
                    ev = self._acks.get(pid)
                    if ev:
                        if kind == SUBACK:
                            self._granted[pid] = data[2:]
                        ev.set()
                else:  # PINGRESP and anything else: read and drop
                    if n:
                        await self._read(n)
        finally:
            pinger.cancel()
            await self.close()

    async def _incoming(self, first, n):
        qos = (first >> 1) & 3
        if qos == 2:
            raise MQTTError("QoS 2 message received")  # never subscribed with QoS 2: a broker fault
        tlen = struct.unpack("!H", await self._read(2))[0]
        rest = n - 2 - tlen - (2 if qos else 0)
        if tlen > MAX_TOPIC:
            await self._skip(tlen)
            topic = None
        else:
            topic = (await self._read(tlen)).decode()
        pid = struct.unpack("!H", await self._read(2))[0] if qos else 0
        if n > self.max_in or topic is None:
            # skip it in small chunks instead of allocating it; still acknowledge it so it is not resent forever,
            # and tell the node (a command too large gets an answer instead of a timeout)
            self.skipped += 1
            head = await self._read(min(rest, OVERSIZE_PEEK)) if rest else b""
            await self._skip(rest - len(head))
            payload = None
        else:
            payload = await self._read(rest) if rest else b""
        if qos:
            await self._send(bytes([PUBACK, 2]) + struct.pack("!H", pid))
        try:
            if payload is not None and self.on_message:
                self.on_message(topic, payload)
            elif payload is None and topic is not None and self.on_oversize:
                self.on_oversize(topic, rest, head)
        except Exception as e:  # a bad message must not stop the reader
            print("on_message error:", e)

    async def _ping(self):
        while True:
            await asyncio.sleep(self.keepalive // 2 or 1)
            await self._send(bytes([PINGREQ, 0]))
