# The serial transport for boards without Wi-Fi: the same JSON objects as over MQTT, one per line, on the UART:
# {"ch": "telemetry", "msg": {...}}. It offers the MQTT client's interface so the node code does not care which.
import asyncio
import json


class SerialLink:
    def __init__(self, uart, device_id, password, root, timeout=10, max_in=4096):
        self.uart = uart
        self.id = device_id
        self.password = password
        self.root = root
        self.timeout = timeout
        self.max_in = max_in
        self.on_message = None
        self.connected = False
        self.skipped = 0
        self._r = asyncio.StreamReader(uart)
        self._w = asyncio.StreamWriter(uart, {})
        self._lock = asyncio.Lock()

    async def _line(self, ch, msg):
        data = json.dumps({"ch": ch, "msg": msg}) + "\n"
        async with self._lock:
            self._w.write(data.encode())
            await asyncio.wait_for(self._w.drain(), self.timeout)

    async def connect(self):
        """Say who we are; the gateway checks the credential as its broker would."""
        await self._line("hello", {"id": self.id, "password": self.password})
        while True:
            line = await asyncio.wait_for(self._r.readline(), self.timeout)  # type: bytes
            try:
                reply = json.loads(line)
            except ValueError:
                continue  # noise on the line before the gateway answers
            if reply.get("ch") == "welcome":
                if reply.get("msg", {}).get("error"):
                    raise OSError("refused by the gateway: %s" % reply["msg"]["error"])
                self.connected = True
                return

    async def publish(self, topic, payload, qos=0, retain=False, retries=0):
        if not self.connected:
            raise OSError("not connected")
        if isinstance(payload, list):  # a message in parts (a batch)
            payload = "".join(p if isinstance(p, str) else p.decode() for p in payload)
        if isinstance(payload, bytes):
            payload = payload.decode()
        try:
            msg = json.loads(payload)
        except ValueError:
            msg = payload  # plain text (status)
        try:
            await self._line(topic[len(self.root):], msg)
        except Exception:
            await self.close()
            raise

    async def subscribe(self, topics, qos=1):
        pass  # the gateway sends a serial device everything addressed to it

    async def run(self):
        try:
            while True:
                line = await self._r.readline()
                if not line:
                    raise OSError("serial line closed")
                if len(line) > self.max_in:
                    self.skipped += 1
                    continue
                try:
                    message = json.loads(line)
                    ch, msg = message["ch"], message.get("msg")
                except (ValueError, KeyError, TypeError):
                    continue
                if self.on_message:
                    try:
                        self.on_message(self.root + ch, json.dumps(msg))
                    except Exception as e:
                        print("on_message error:", e)
        finally:
            await self.close()

    async def close(self):
        self.connected = False
