"""What crosses a wire, shared by the gateway and the relay: the edge <-> cloud envelope and its frame limits, and JSON
decoding with bounds for everything either reads from others.

Python's JSON decoder recurses once per nesting level, so 1,100 nested brackets (2.2 KB) raise RecursionError, which
no `except ValueError` catches. `loads` measures depth and size on the raw text first and refuses what is out of
bounds with a ValueError, so every caller's existing handling of malformed JSON covers it.
"""

from __future__ import annotations

import json
import re
import time
import tomllib
import uuid
from typing import Any

MAX_DEPTH = 32  # the deepest legitimate message (a twin state holding an object) needs 4
MAX_ITEMS = 20_000  # object members plus array elements in one document
MAX_INTEGER = 2**63 - 1  # SQLite's largest INTEGER: a larger counter or offset fails the whole group commit

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string literal, escapes included
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b"[]{},")

MAX_FRAME = 8 * 1024 * 1024  # bytes, both directions
# JSON bounds for a frame: the envelope wraps device data (itself at most MAX_DEPTH deep) in a few levels, and a
# batch of 200 outbox rows holds tens of thousands of items. A frame refused for its shape would be lost data.
FRAME_DEPTH = 64
FRAME_ITEMS = MAX_FRAME // 4


class TooComplex(ValueError):
    """Valid or not, the document is nested too deep or holds too many items to be decoded safely."""


def measure(data: bytes) -> tuple[int, int]:
    """(depth, items) of a JSON text, counted outside string literals; an unterminated string counts as text."""
    structure = _STRING.sub(b"", data).translate(None, _NOT_STRUCTURE)
    depth = deepest = 0
    for byte in structure:
        if byte in b"[{":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif byte in b"]}":
            depth -= 1
    items = structure.count(b",") + (1 if deepest else 0)
    return deepest, items


def loads(data: bytes | bytearray | str, *, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS) -> Any:
    """json.loads that raises ValueError (TooComplex) instead of recursing without bound.

    Cheap for the small messages devices send: one regex pass and one pass over the brackets and commas.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if b"[" in raw or b"{" in raw:
        depth, items = measure(raw)
        if depth > max_depth:
            raise TooComplex(f"JSON nested {depth} levels deep (limit {max_depth})")
        if items > max_items:
            raise TooComplex(f"JSON with about {items} items (limit {max_items})")
    try:
        return json.loads(data)
    except RecursionError as exc:  # bounded above; kept so no input can ever raise it past a caller
        raise TooComplex("JSON nested too deep") from exc


def loads_toml(text: str) -> dict[str, Any]:
    """tomllib.loads, with nesting that exhausts the stack reported as a ValueError like any other TOML error."""
    try:
        return tomllib.loads(text)
    except RecursionError as exc:
        raise TooComplex("TOML nested too deep") from exc


def clip(text: object, limit: int = 200) -> str:
    """A user-controlled value cut for a log line: a 60,000-character username must not be logged whole, and a
    newline or other control character in it is shown escaped (a name with "\n" forged a whole log line)."""
    shown = repr(text) if not isinstance(text, str) else text
    if not shown.isprintable():
        shown = shown.encode("unicode_escape").decode("ascii")
    return shown if len(shown) <= limit else f"{shown[:limit]}...(+{len(shown) - limit} chars)"


def envelope(op: str, resource: str = "", body: Any = None, parent: str | None = None,
             message_id: str | None = None) -> str:
    return json.dumps({"id": message_id or uuid.uuid4().hex, "parent": parent, "op": op, "resource": resource,
                       "body": body if body is not None else {}, "ts": time.time()})
