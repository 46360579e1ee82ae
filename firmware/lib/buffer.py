# Readings kept on flash until the gateway acknowledges them.
# One line per reading, "boot seq payload", appended as it is taken, so a reboot or power loss loses nothing
# that was recorded. The gateway's ack (highest contiguous committed seq of a boot) is kept in a small file;
# acknowledged lines are dropped when the file is compacted. When full, the oldest readings are dropped and counted.
# A boot's seqs are contiguous in the file (appended in order, dropped from the head or up to an ack), so the
# count of unacknowledged readings comes from a range per boot kept in memory, not from reading the file.
import json
import os


def exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def parse(line):
    """(boot, seq, payload) of a buffer line, or None for a line cut short by a power loss mid-write
    (each line is written with its newline in one write, so a line without one is torn)."""
    if not line.endswith("\n"):
        return None
    parts = line[:-1].split(" ", 2)
    if len(parts) != 3 or not parts[2].endswith("}"):
        return None
    try:
        return int(parts[0]), int(parts[1]), parts[2]
    except ValueError:
        return None


class Buffer:
    def __init__(self, path="buffer.log", capacity=500):
        self.path = path
        self.capacity = capacity
        self.acked = {}  # boot -> highest acked seq
        self.dropped = 0
        self.held = {}  # boot -> [first seq in the file, number of its lines]
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
        torn = 0
        if exists(path):
            with open(path) as f:
                for line in f:
                    record = parse(line)
                    if record:
                        self._hold(record[0], record[1])
                    else:
                        torn += 1
        if torn:  # a reading cut short by a power loss: count it lost, and start the next append on a fresh line
            self.dropped += torn
            self.compact()

    @property
    def count(self):
        """Lines in the file, acknowledged or not."""
        return sum(lines for _, lines in self.held.values())

    def _hold(self, boot, seq):
        held = self.held.get(boot)
        if held is None:
            self.held[boot] = [seq, 1]
        else:
            held[1] += 1

    def _is_acked(self, boot, seq):
        return seq <= self.acked.get(boot, 0)

    def add(self, boot, seq, payload):
        with open(self.path, "a") as f:
            f.write("%d %d %s\n" % (boot, seq, payload))
        self._hold(boot, seq)
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
                    record = parse(line)
                    if record and not self._is_acked(record[0], record[1]):
                        yield record
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
        held = self.held.get(boot)
        if held is None:
            return None
        seq = max(held[0], self.acked.get(boot, 0) + 1)
        return seq if seq < held[0] + held[1] else None

    def ack(self, boot, seq):
        """Trim up to (boot, seq); True if that moved the watermark."""
        if seq <= self.acked.get(boot, 0):
            return False
        self.acked[boot] = seq
        self._save_ack()
        if self.count >= 16 and self.unacked() < self.count // 2:
            self._compact_soon()
        return True

    def unacked(self):
        n = 0
        for boot, (first, lines) in self.held.items():
            n += lines - min(max(self.acked.get(boot, 0) - first + 1, 0), lines)
        return n

    def _save_ack(self):
        with open(self.path + ".ack.tmp", "w") as f:
            json.dump({"acked": self.acked, "dropped": self.dropped}, f)
        os.rename(self.path + ".ack.tmp", self.path + ".ack")

    def compact(self):
        """Rewrite the file with the unacknowledged lines only, dropping the oldest beyond capacity."""
        self._compact_due = False
        drop = max(0, self.unacked() - self.capacity)
        self.held = {}
        with open(self.path + ".tmp", "w") as out:
            for boot, seq, payload in self.pending():
                if drop:
                    drop -= 1
                    self.dropped += 1
                    continue
                out.write("%d %d %s\n" % (boot, seq, payload))
                self._hold(boot, seq)
        os.rename(self.path + ".tmp", self.path)
        # acks of boots with nothing left are no longer needed, except the newest
        newest = max(self.acked) if self.acked else None
        self.acked = {b: s for b, s in self.acked.items() if b in self.held or b == newest}
        self._save_ack()
