"""The edge link's protocol without I/O (as h11 is for HTTP): the rules both ends follow, in one place.

The gateway's EdgeHub and the relay are I/O around these two classes: they feed them the frames they receive and the
rows they read, and send the frames the classes make. Nothing here reads a socket or a store, so the rules are tested
without either (tests/test_edgelink.py).

Up (edge -> relay): the edge's outbox rows, by offset, in batches (`up`); at most `in_flight` batches unacknowledged;
the relay answers `ack` with the highest offset it has stored; the edge deletes only what is acknowledged. A new link
resumes from the first row not acknowledged. A frame the relay cannot use is answered `error` and the link ends:
batches are pipelined, so acknowledging a later one would tell the edge to delete what this one held.
Down (relay -> edge): each queued message once per link (`apply`, with its id), until the edge answers `applied`
(`parent` = the id); the relay sends it again on the edge's next link if the answer never came.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgetrio import wire
from edgetrio.wire import FRAME_DEPTH, FRAME_ITEMS, MAX_FRAME, envelope

BATCH_ROWS = 200
BATCHES_IN_FLIGHT = 4


def _parse(raw: str | bytes) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """A frame's envelope, op and body (an object); ValueError, KeyError or TypeError when it is not one."""
    message = wire.loads(raw, max_depth=FRAME_DEPTH, max_items=FRAME_ITEMS)
    if not isinstance(message, dict):
        raise TypeError("a frame must be a JSON object")
    op = message["op"]
    body = message.get("body") or {}
    if not isinstance(body, dict):
        raise TypeError("body must be an object")
    return message, str(op), body


# -- what the edge hears ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Acked:
    """The relay stored everything up to `offset`; `advanced`: it is more than it had said before."""
    offset: int
    advanced: bool


@dataclass(frozen=True)
class Apply:
    """A message from the relay to apply once, then answer with `EdgeProtocol.applied`."""
    message_id: str
    resource: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Refused:
    """The relay could not use something sent: the link must end; the next one resumes from the last ack."""
    reason: str


@dataclass(frozen=True)
class Ignored:
    """A frame that says nothing this edge can act on (malformed, or an apply without an id)."""
    reason: str


class EdgeProtocol:
    """The edge's side: what to send next, what the relay's frames mean."""

    def __init__(self, batch_rows: int = BATCH_ROWS, in_flight: int = BATCHES_IN_FLIGHT, max_frame: int = MAX_FRAME) -> None:
        self.batch_rows, self.max_in_flight, self.max_frame = batch_rows, in_flight, max_frame
        self.acked = 0  # the highest offset the relay stored
        self.sent = 0  # the highest offset sent on this link
        self.in_flight: list[int] = []  # the last offset of each batch sent and not acknowledged

    def connected(self) -> None:
        """A new link: resume from the first row the relay has not acknowledged."""
        self.sent = self.acked
        self.in_flight = []

    def window_open(self) -> bool:
        """Whether another batch may go now (fewer than `in_flight` unacknowledged)."""
        self.in_flight = [o for o in self.in_flight if o > self.acked]
        return len(self.in_flight) < self.max_in_flight

    def batch(self, rows: Sequence[dict[str, Any]]) -> str:
        """The next `up` frame of outbox rows (those after `sent`, in offset order): halved until it fits a frame."""
        rows = list(rows)
        frame = envelope("up", "batch", {"items": rows})
        while len(frame) > self.max_frame and len(rows) > 1:
            rows = rows[: len(rows) // 2]
            frame = envelope("up", "batch", {"items": rows})
        self.sent = int(rows[-1]["offset"])
        self.in_flight.append(self.sent)
        return frame

    def receive(self, raw: str | bytes) -> Acked | Apply | Refused | Ignored:
        try:
            message, op, body = _parse(raw)
            offset = int(body.get("offset", 0)) if op == "ack" else 0
        except (ValueError, KeyError, TypeError, OverflowError):
            return Ignored("a malformed frame from the relay")
        if op == "ack":
            advanced = offset > self.acked
            self.acked = max(self.acked, offset)
            return Acked(self.acked, advanced)
        if op == "apply":
            message_id = message.get("id")
            if not isinstance(message_id, str):
                return Ignored("an apply frame without an id")
            return Apply(message_id, str(message.get("resource")), body)
        if op == "error":
            return Refused(str(body.get("message")))
        return Ignored(f"unknown op {op!r}")

    def applied(self, apply: Apply, result: dict[str, Any]) -> str:
        """The answer to an applied message (or one that could not be: its result says why)."""
        return envelope("applied", apply.resource, result, parent=apply.message_id)


# -- what the relay hears --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Up:
    """A batch of the edge's outbox rows to store, then answer with `RelayProtocol.ack`."""
    items: list[Any]
    frame_id: Any


@dataclass(frozen=True)
class Applied:
    """The edge applied (or refused) the down message `parent`."""
    parent: str
    result: dict[str, Any]


@dataclass(frozen=True)
class Unusable:
    """A frame that may have carried rows the relay could not take: answer `refusal` and end the link."""
    reason: str


@dataclass(frozen=True)
class Unknown:
    """A well-formed frame of an op this relay does not know: answered, the link goes on."""
    op: str


class RelayProtocol:
    """The relay's side of one link: what the edge's frames mean, what is sent down on this link."""

    def __init__(self) -> None:
        self.sent: set[str] = set()  # ids sent on this link and not yet confirmed
        self.refused = False  # a frame was refused: the link ends, and nothing after it may be stored

    def receive(self, raw: str | bytes) -> Up | Applied | Unusable | Unknown | None:
        """What a frame asks; None when there is nothing to do (an `applied` without a parent id, anything after a
        refusal: rows behind a refused batch would leave a gap the ack would paper over)."""
        if self.refused:
            return None
        try:
            message, op, body = _parse(raw)
        except (ValueError, KeyError, TypeError) as exc:
            return Unusable(f"malformed frame: {exc}")
        if op == "up":
            items = body.get("items")
            if not isinstance(items, list):
                return Unusable("up needs a list of items")
            return Up(items, message.get("id"))
        if op == "applied":
            parent = message.get("parent")
            if not isinstance(parent, str):
                return None
            self.sent.discard(parent)
            return Applied(parent, body)
        return Unknown(op)

    def ack(self, offset: int, up: Up) -> str:
        return envelope("ack", body={"offset": offset}, parent=up.frame_id)

    def refusal(self, unusable: Unusable) -> str:
        self.refused = True
        return envelope("error", body={"message": unusable.reason})

    def unknown(self, unknown: Unknown) -> str:
        return envelope("error", body={"message": f"unknown op {unknown.op!r}"})

    def to_send(self, queued: Sequence[dict[str, Any]]) -> list[str]:
        """`apply` frames for the queued messages (id, resource, body; in queue order) not yet sent on this link."""
        frames = []
        for row in queued:
            if row["id"] in self.sent:
                continue
            frames.append(envelope("apply", row["resource"], row["body"], message_id=row["id"]))
            self.sent.add(row["id"])
        return frames
