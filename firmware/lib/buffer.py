# Readings kept on flash until the gateway acknowledges them.
# One line per reading, "boot seq payload", appended as it is taken, so a reboot or power loss loses nothing
# that was recorded. The gateway's ack (highest contiguous committed seq of a boot) is kept in a small file;
# acknowledged lines are dropped when the file is compacted. When full, the oldest readings are dropped and counted.
# A boot's seqs are contiguous in the file (appended in order, dropped from the head or up to an ack), so the
# count of unacknowledged readings comes from a range per boot kept in memory, not from reading the file.
#
# Readers walk the file in steps (`read(pos)`), holding nothing open between them: the sender awaits between steps,
# and a walk it abandons (a failed publish) must not keep compaction waiting. A compaction bumps `generation`, which
# tells a reader its position is stale.
import json
import os
import time

ACK_SAVE_MS = 30000  # the ack watermark goes to flash at most this often (a lost one only resends acked readings)


def exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def parse(line):
    """(boot, seq, payload bytes) of a buffer line (bytes), or None for a line cut short by a power loss mid-write
    (each line is written with its newline in one write, so a line without one is torn)."""
    if not line.endswith(b"\n"):
        return None
    parts = line[:-1].split(b" ", 2)
    if len(parts) != 3 or not parts[2].endswith(b"}"):
        return None
    try:  # the payload stays bytes: the sender copies it into its packet as it is
        return int(parts[0]), int(parts[1]), parts[2]
    except ValueError:
        return None


class Buffer:
    def __init__(self, path="buffer.log", capacity=500):
        self.path = path
        self.capacity = capacity
        # unacknowledged readings may exceed the capacity by this much before the oldest are dropped, so a full
        # buffer rewrites the file once per `slack` readings instead of once per reading
        self.slack = max(8, capacity // 8)
        self.acked = {}  # boot -> highest acked seq
        self.dropped = 0
        self.rewrites = 0  # compactions since boot (flash wear)
        self.generation = 0  # bumped by every compaction: positions from `read` are then stale
        self.held = {}  # boot -> [first seq in the file, number of its lines]
        self._ack_saved = {}
        self._ack_saved_at = time.ticks_ms()
        if exists(path + ".ack"):
            try:
                with open(path + ".ack") as f:
                    saved = json.load(f)
                self.acked = {int(k): v for k, v in saved["acked"].items()}
                self.dropped = saved.get("dropped", 0)
            except (ValueError, KeyError):
                pass
        self._ack_saved = dict(self.acked)
        torn = 0
        if exists(path):
            with open(path, "rb") as f:
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

    def is_acked(self, boot, seq):
        return seq <= self.acked.get(boot, 0)

    def add(self, boot, seq, payload):
        with open(self.path, "a") as f:
            f.write("%d %d %s\n" % (boot, seq, payload))
        self._hold(boot, seq)
        if self.unacked() > self.capacity + self.slack or self.count > 2 * self.capacity + self.slack:
            self.compact()

    def read(self, pos, limit=8):
        """Up to `limit` unacknowledged readings (boot, seq, payload) from byte `pos` of the file, oldest first, and
        the position to go on from. Start at 0; start again at 0 when `generation` has changed since."""
        records = []  # type: list[tuple[int, int, bytes]]
        if not exists(self.path):
            return records, 0
        with open(self.path, "rb") as f:
            f.seek(pos)
            while len(records) < limit:
                line = f.readline()
                if not line:
                    break
                record = parse(line)
                if record is None:
                    if not line.endswith(b"\n"):
                        break  # a line being written (or torn): read it again next time
                    pos += len(line)
                    continue
                pos += len(line)
                if not self.is_acked(record[0], record[1]):
                    records.append(record)
        return records, pos

    def pending(self):
        """Every unacknowledged reading, oldest first (a list: for tests and tools, not the sender)."""
        records, _ = self.read(0, self.count + 1)
        return records

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
        if self.count >= 16 and self.unacked() < self.count // 2:
            self.compact()  # saves the acks too
        elif time.ticks_diff(time.ticks_ms(), self._ack_saved_at) >= ACK_SAVE_MS:
            self._save_ack()
        return True

    def unacked(self):
        n = 0
        for boot, (first, lines) in self.held.items():
            n += lines - min(max(self.acked.get(boot, 0) - first + 1, 0), lines)
        return n

    def flush(self):
        """Save the ack watermark if it moved (before a planned reset)."""
        if self.acked != self._ack_saved:
            self._save_ack()

    def _save_ack(self):
        with open(self.path + ".ack.tmp", "w") as f:
            json.dump({"acked": self.acked, "dropped": self.dropped}, f)
        os.rename(self.path + ".ack.tmp", self.path + ".ack")
        self._ack_saved = dict(self.acked)
        self._ack_saved_at = time.ticks_ms()

    def compact(self):
        """Rewrite the file with the unacknowledged lines only, dropping the oldest beyond capacity."""
        drop = max(0, self.unacked() - self.capacity)
        held = {}  # type: dict[int, list[int]]
        self.held = held
        if exists(self.path):
            with open(self.path, "rb") as src, open(self.path + ".tmp", "wb") as out:
                for line in src:
                    record = parse(line)
                    if record is None or self.is_acked(record[0], record[1]):
                        continue
                    if drop:
                        drop -= 1
                        self.dropped += 1
                        continue
                    out.write(line)
                    self._hold(record[0], record[1])
            os.rename(self.path + ".tmp", self.path)
        self.rewrites += 1
        self.generation += 1
        # acks of boots with nothing left are no longer needed, except the newest
        newest = max(self.acked) if self.acked else None
        self.acked = {b: s for b, s in self.acked.items() if b in self.held or b == newest}
        self._save_ack()
