# Readings kept on flash until the gateway acknowledges them.
# One line per reading, "boot seq payload", appended as it is taken, so a reboot or power loss loses nothing
# that was recorded. The gateway's ack (highest contiguous committed seq of a boot) is kept in a small file;
# acknowledged lines are dropped when the file is compacted. When full, the oldest readings are dropped and counted.
import json
import os


def exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


class Buffer:
    def __init__(self, path="buffer.log", capacity=500):
        self.path = path
        self.capacity = capacity
        self.acked = {}  # boot -> highest acked seq
        self.dropped = 0
        self.count = 0  # lines in the file, acked or not
        # compaction renames the file, so it waits while a reader is walking it (the sender awaits mid-walk)
        self._readers = 0
        self._compact_due = False
        if exists(path + ".ack"):
            try:
                with open(path + ".ack") as f:
                    saved = json.load(f)
                self.acked = {int(k): v for k, v in saved["acked"].items()}
                self.dropped = saved.get("dropped", 0)
            except (ValueError, KeyError):
                pass
        if exists(path):
            with open(path) as f:
                for _ in f:
                    self.count += 1

    def _is_acked(self, boot, seq):
        return seq <= self.acked.get(boot, 0)

    def add(self, boot, seq, payload):
        with open(self.path, "a") as f:
            f.write("%d %d %s\n" % (boot, seq, payload))
        self.count += 1
        if self.count > self.capacity:
            self._compact_soon()

    def pending(self):
        """(boot, seq, payload) of every reading not yet acknowledged, oldest first (read from flash)."""
        if not exists(self.path):
            return
        self._readers += 1
        try:
            with open(self.path) as f:
                for line in f:
                    boot, seq, payload = line.rstrip("\n").split(" ", 2)
                    boot, seq = int(boot), int(seq)
                    if not self._is_acked(boot, seq):
                        yield boot, seq, payload
        finally:
            self._readers -= 1
        if self._compact_due and not self._readers:
            self.compact()

    def _compact_soon(self):
        if self._readers:
            self._compact_due = True
        else:
            self.compact()

    def first(self, boot):
        """Lowest seq of `boot` still held (the gateway may skip what is below it)."""
        for b, seq, _ in self.pending():
            if b == boot:
                return seq
        return None

    def ack(self, boot, seq):
        if seq <= self.acked.get(boot, 0):
            return
        self.acked[boot] = seq
        self._save_ack()
        if self.count >= 16 and self.unacked() < self.count // 2:
            self._compact_soon()

    def unacked(self):
        return sum(1 for _ in self.pending())

    def _save_ack(self):
        with open(self.path + ".ack.tmp", "w") as f:
            json.dump({"acked": self.acked, "dropped": self.dropped}, f)
        os.rename(self.path + ".ack.tmp", self.path + ".ack")

    def compact(self):
        """Rewrite the file with the unacknowledged lines only, dropping the oldest beyond capacity."""
        self._compact_due = False
        keep = self.unacked()
        drop = max(0, keep - self.capacity)
        count = 0
        boots = set()
        with open(self.path + ".tmp", "w") as out:
            for boot, seq, payload in self.pending():
                if drop:
                    drop -= 1
                    self.dropped += 1
                    continue
                out.write("%d %d %s\n" % (boot, seq, payload))
                boots.add(boot)
                count += 1
        os.rename(self.path + ".tmp", self.path)
        self.count = count
        # acks of boots with nothing left are no longer needed, except the newest
        newest = max(self.acked) if self.acked else None
        self.acked = {b: s for b, s in self.acked.items() if b in boots or b == newest}
        self._save_ack()
