# Firmware updates over the air (imported at the first `ota` message: a board that gets none saves the heap).
#
# The gateway sends a bundle (the .mpy files `edgetrio flash` writes into lib/, and their manifest) in chunks on
# `ota`, each a JSON header line and the raw bytes; each is written at its offset into a staging folder, the manifest
# is checked against the bundle's id and each file against the manifest's sha256. The swap is one atomic step:
# firmware.json, renamed into place, names the new folder the trial; main.py boots it (and goes back to the folder
# that worked after TRIES boots that did not confirm), and the board confirms it at its first acknowledged reading. A transfer cut by a power loss resumes from what the staging folder holds.
import asyncio
import binascii
import gc
import hashlib
import json
import os
import machine

FIRMWARE_FILE = "firmware.json"  # {"active": folder, "bundle": id, "trial": folder|None, "tries": n, ...}
MANIFEST = "manifest.txt"  # file 0 of a bundle: 'name size sha256' lines, whose sha256 is the bundle id


def load():
    try:
        with open(FIRMWARE_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"active": "lib"}


def save(fw):
    with open(FIRMWARE_FILE + ".tmp", "w") as f:
        json.dump(fw, f)
    os.rename(FIRMWARE_FILE + ".tmp", FIRMWARE_FILE)  # LittleFS renames atomically: a power cut leaves old or new


def folder_of(bundle):
    return "fw-" + bundle[:12]


def hex_of(h):
    return binascii.hexlify(h.digest()).decode()


def sha_of(path):
    h, block = hashlib.sha256(), bytearray(256)  # one small buffer: a board's heap is fragmented
    view = memoryview(block)
    with open(path, "rb") as f:
        while True:
            n = f.readinto(block)
            if not n:
                return hex_of(h)
            h.update(view[:n])


def size_of(path):
    try:
        return os.stat(path)[6]
    except OSError:
        return -1


def remove_folder(folder):
    try:
        for entry in os.ilistdir(folder):
            os.remove(folder + "/" + entry[0])
        os.rmdir(folder)
    except OSError:
        pass


def check_entry(line):
    """A manifest line as (name, size, sha256); ValueError if it is not one a board takes."""
    name, size, sha = line.split()
    size = int(size)
    if not name.endswith(".mpy") or "/" in name or name.startswith(".") or size < 0 or len(sha) != 64:
        raise ValueError("manifest line %r: a .mpy name, its size and sha256" % line[:80])
    return name, size, sha


def free_bytes():
    try:
        st = os.statvfs("/")
        return st[0] * st[4]
    except (OSError, AttributeError):
        return None


class Receiver:
    """One bundle being received; the gateway learns where to go on from each answer.

    File 0 is the bundle's manifest ('name size sha256' lines; its sha256 is the bundle id), files 1.. are what it
    lists, in its order. Only the current file's line is held: the heap of a board is small."""

    def __init__(self, node):
        self.node = node
        self.bundle = None
        self.folder = ""
        self.count = 0  # files, the manifest included
        self.manifest_size = 0
        self.file = 0  # where the next chunk goes
        self.offset = 0
        self.confirm_s = 300
        self.limit = 0  # the chunk size asked for after running out of memory (0: as the heap allows)

    def answer(self, state, **more):
        body = {"bundle": self.bundle, "state": state}
        body.update(more)
        return body

    def begin(self, body):
        bundle, fw = body.get("bundle"), load()
        if not isinstance(bundle, str) or len(bundle) != 64:
            return {"bundle": bundle, "state": "failed", "reason": "no bundle id"}
        self.bundle = bundle
        if fw.get("bundle") == bundle and not fw.get("trial"):
            return self.answer("confirmed", version=self.node.version)
        if fw.get("trial_bundle") == bundle and fw.get("trial"):
            return self.answer("trial")  # rebooted into it: it confirms at the first acknowledged reading
        failed = fw.get("failed") or {}
        if failed.get("bundle") == bundle and not body.get("again"):  # not installed again unless asked anew
            return self.answer("rolled back", reason=failed.get("reason"))
        folder = folder_of(bundle)
        if folder in (fw.get("active"), fw.get("previous")):
            folder = "fw-" + bundle[12:24]  # the same prefix as a folder in use: stage beside it, not over it
        new = size_of(folder) < 0  # else a transfer of this bundle was cut short: it resumes
        if new:  # said before restarting for it: a bundle the flash cannot hold costs no restart
            free, total = free_bytes(), int(body.get("total") or 0)
            if free is not None and free < total + 16384:
                self.bundle = None
                return {"bundle": bundle, "state": "failed",
                        "reason": "not enough flash: %d bytes free, the bundle needs %d" % (free, total)}
        if self.node.board is not None:  # the sensors hold the heap: restart without them to receive
            fw["receive"] = bundle
            save(fw)
            return self.answer("restarting")
        self.count, self.manifest_size = int(body["count"]), int(body["size"])
        self.confirm_s = body.get("confirm_s") or 300
        if new:
            os.mkdir(folder)
        self.folder = folder
        self.resume()
        return self.next()

    def entry(self, i):
        """(name, size, sha256) of file i: the manifest itself, or its line i."""
        if i == 0:
            return MANIFEST, self.manifest_size, self.bundle
        with open(self.folder + "/" + MANIFEST) as f:
            for n, line in enumerate(f):
                if n == i - 1:
                    return check_entry(line)
        raise ValueError("the manifest lists fewer than %d files" % (self.count - 1))

    def resume(self):
        """Where the staging folder leaves off: complete files are checked again, a bad one starts over."""
        for i in range(self.count):
            name, size, sha = self.entry(i)
            path = self.folder + "/" + name
            have = size_of(path)
            if have == size and sha_of(path) == sha:
                continue
            if have >= size:  # longer than it should be, or complete but not what was sent
                os.remove(path)
                have = 0
            self.file, self.offset = i, max(have, 0)
            return
        self.file, self.offset = self.count, 0

    def chunk_size(self):
        size = chunk_limit(self.node)
        return min(size, self.limit) if self.limit else size

    def out_of_memory(self):
        """A chunk did not fit in the heap: ask for smaller ones from where it stands."""
        self.limit = max(128, (self.limit or chunk_limit(self.node)) // 2)
        return self.next() if self.bundle else {"bundle": None, "state": "failed", "reason": "out of memory"}

    def next(self):
        if self.file < self.count:
            return self.answer("receiving", file=self.file, offset=self.offset, chunk=self.chunk_size())
        return self.install()

    def chunk(self, head, data):
        """Write `data` (a memoryview of the message, not a copy) if it is the chunk expected next."""
        if self.bundle is None or head.get("bundle") != self.bundle:
            return {"bundle": head.get("bundle"), "state": "failed", "reason": "not the bundle being received"}
        i, offset = head.get("file"), head.get("offset")
        if i != self.file or offset != self.offset:
            return self.next()  # out of step (a repeated or lost chunk): say where to go on
        name, size, sha = self.entry(i)
        path = self.folder + "/" + name
        if offset + len(data) > size:
            os.remove(path)
            self.offset = 0
            return self.answer("receiving", file=i, offset=0, chunk=self.chunk_size(),
                               error="%s: more bytes than its size" % name)
        with open(path, "ab") as f:
            f.write(data)
        self.offset += len(data)
        if self.offset == size:
            if sha_of(path) != sha:
                os.remove(path)
                self.offset = 0
                return self.answer("receiving", file=i, offset=0, chunk=self.chunk_size(),
                                   error="%s: sha256 does not match" % name)
            if i == 0:
                self.check_manifest()
            self.file, self.offset = i + 1, 0
        return self.next()

    def check_manifest(self):
        """Every line of a received manifest is a file this board takes, and they are as many as announced."""
        n = 0
        with open(self.folder + "/" + MANIFEST) as f:
            for line in f:
                check_entry(line)
                n += 1
        if n != self.count - 1:
            raise ValueError("the manifest lists %d files, not %d" % (n, self.count - 1))

    def install(self):
        """Every file is there and checked: name the folder the trial (one atomic rename); the board resets."""
        fw = load()
        fw["trial"], fw["trial_bundle"], fw["tries"] = self.folder, self.bundle, 0
        fw["confirm_s"] = self.confirm_s
        fw.pop("failed", None)
        fw.pop("error", None)
        fw.pop("receive", None)
        save(fw)
        return self.answer("installed")


def chunk_limit(node):
    """The largest chunk this board takes: what fits in a message it accepts, and a small part of its heap."""
    client = node.link.client
    limit = client.max_in - 256 if client is not None else 1024
    return max(256, min(limit, gc.mem_free() // 16) // 64 * 64)  # a fragmented heap has no larger holes


def report(node, answer):
    asyncio.create_task(node.link.publish("ota/status", json.dumps(answer)))


def receive(node, payload):
    """An `ota` message: a begin (what runs is answered at once) or a chunk; the answer goes back on ota/status."""
    if node.ota is None:
        node.ota = Receiver(node)
    gc.collect()
    end = payload.find(b"\n")
    head = {}
    try:
        head = json.loads(payload[:end] if end >= 0 else payload)
        if head.get("op") == "begin":
            answer = node.ota.begin(head)
        else:
            answer = node.ota.chunk(head, memoryview(payload)[end + 1:])
    except MemoryError:
        payload = None
        head = {}
        gc.collect()
        answer = node.ota.out_of_memory()
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:  # a full flash, a garbled message
        answer = {"bundle": head.get("bundle") if isinstance(head, dict) else None, "state": "failed",
                  "reason": "%s: %s" % (type(e).__name__, e)}
    gc.collect()
    report(node, answer)
    state = answer["state"]
    if state == "installed":
        asyncio.create_task(restart(node, "firmware update installed, restarting into it"))
    elif state == "restarting":
        asyncio.create_task(restart(node, "restarting to receive a firmware update, sensors off"))
    elif state in ("failed", "confirmed") and node.updating:
        leave_update_mode(node, "firmware update %s: %s" % (state, answer.get("reason", "nothing to do")))


def leave_update_mode(node, why):
    fw = load()
    fw.pop("receive", None)
    save(fw)
    asyncio.create_task(restart(node, why + "; restarting with the sensors on"))


async def restart(node, why):
    node.log("info", why)
    await asyncio.sleep(0.5)  # the answer and the log line leave first
    node.buffer.flush()
    machine.reset()


async def watch(node):
    """An update that stops coming (cancelled, the gateway gone) gives the sensors back after two minutes."""
    last = None  # type: tuple[int, int] | None
    while True:
        await asyncio.sleep(120)
        now = (node.ota.file, node.ota.offset) if node.ota else None
        if now == last:
            leave_update_mode(node, "no firmware update chunk for 2 minutes")
            return
        last = now
