# The board's flash as its filesystem: the flash directory mounted at "/", so `mpremote fs cp x :/main.py` writes the
# board's main.py and never the host's, and a size like a 4 MB ESP32's default 2 MiB LittleFS partition for `df`.
import os
import vfs

BLOCK = 4096
BLOCKS = 512  # 2 MiB
HIDDEN = ("sim", "console.log")  # the simulator's files in the flash folder: not a board's


def _inside(path):
    """An absolute path that cannot climb above the flash's root."""
    if not path.startswith("/"):
        return path  # relative to the current folder, which is inside
    parts = []
    for part in path.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part and part != ".":
            parts.append(part)
    return "/" + "/".join(parts)


class Flash(vfs.VfsPosix):
    def open(self, path, mode):
        return super().open(_inside(path), mode)

    def stat(self, path):
        return super().stat(_inside(path))

    def ilistdir(self, path):
        """As LittleFS lists a folder: (name, type, inode, size); the simulator's own files (its controls in sim/,
        the console log) are not on a board's flash and are not listed."""
        path = _inside(path)
        at_root = _inside(path if path.startswith("/") else os.getcwd() + "/" + path) == "/"
        for entry in super().ilistdir(path):
            name = entry[0]
            if at_root and name in HIDDEN:
                continue
            size = 0 if entry[1] == 0x4000 else super().stat(path.rstrip("/") + "/" + name if path else name)[6]
            yield (name, entry[1], 0, size)

    def __repr__(self):
        return "<VfsLfs2>"  # what a 4 MB ESP32's filesystem is

    def mkdir(self, path):
        return super().mkdir(_inside(path))

    def remove(self, path):
        return super().remove(_inside(path))

    def rmdir(self, path):
        return super().rmdir(_inside(path))

    def rename(self, old, new):
        return super().rename(_inside(old), _inside(new))

    def chdir(self, path):
        return super().chdir(_inside(path))

    def _used(self, path):
        """Blocks in use under `path` (a path inside the flash): one per folder and file, plus the data."""
        blocks = 0
        for entry in self.ilistdir(path):
            name, kind = entry[0], entry[1]
            inner = path.rstrip("/") + "/" + name
            if kind == 0x4000:
                blocks += 1 + self._used(inner)
            else:
                blocks += 1 + (self.stat(inner)[6] + BLOCK - 1) // BLOCK
        return blocks

    def statvfs(self, path):
        free = max(0, BLOCKS - self._used("/"))
        return (BLOCK, BLOCK, BLOCKS, free, free, 0, 0, 0, 0, 255)


def mount_flash():
    """Mount the current directory (the board's flash) at "/" and go there."""
    root = os.getcwd()
    vfs.umount("/")
    vfs.mount(Flash(root), "/")
    os.chdir("/")
