"""The edge link's protocol (edgetrio/edgelink.py) without sockets or stores: both ends' rules, and the two ends
talking over a link that drops frames and breaks, with nothing lost and nothing stored or applied twice."""

from __future__ import annotations

import json
import random
from typing import Any

from edgetrio.edgelink import (
    Acked,
    Applied,
    Apply,
    EdgeProtocol,
    Ignored,
    Refused,
    RelayProtocol,
    Unknown,
    Unusable,
    Up,
)
from edgetrio.wire import envelope


def rows(first: int, last: int, size: int = 10) -> list[dict[str, Any]]:
    return [{"offset": o, "ts": 1.0, "resource": "readings", "body": {"pad": "x" * size}} for o in range(first, last + 1)]


def test_the_edge_sends_a_window_of_batches_and_resumes_from_the_last_ack() -> None:
    edge = EdgeProtocol(batch_rows=2, in_flight=2)
    for first in (1, 3):
        assert edge.window_open()
        frame = json.loads(edge.batch(rows(first, first + 1)))
        assert frame["op"] == "up" and [i["offset"] for i in frame["body"]["items"]] == [first, first + 1]
    assert not edge.window_open()  # two batches unacknowledged: wait
    assert edge.receive(envelope("ack", body={"offset": 2})) == Acked(2, True)
    assert edge.window_open() and edge.sent == 4
    assert edge.receive(envelope("ack", body={"offset": 1})) == Acked(2, False)  # an old ack moves nothing back
    edge.connected()  # a new link: from the first row not acknowledged
    assert edge.sent == 2 and edge.window_open()


def test_a_batch_is_halved_until_it_fits_a_frame() -> None:
    edge = EdgeProtocol(max_frame=3000)
    frame = json.loads(edge.batch(rows(1, 40, size=200)))
    sent = [i["offset"] for i in frame["body"]["items"]]
    assert sent == list(range(1, len(sent) + 1)) and 1 <= len(sent) < 40 and edge.sent == sent[-1]


def test_what_the_edge_hears() -> None:
    edge = EdgeProtocol()
    apply = edge.receive(envelope("apply", "twin", {"device": "d1"}, message_id="m1"))
    assert apply == Apply("m1", "twin", {"device": "d1"})
    assert isinstance(apply, Apply)
    answer = json.loads(edge.applied(apply, {"ok": True}))
    assert answer["op"] == "applied" and answer["parent"] == "m1" and answer["body"] == {"ok": True}
    assert edge.receive(envelope("error", body={"message": "bad"})) == Refused("bad")
    for junk in ("{", "[]", json.dumps({"op": "ack", "body": {"offset": "x"}}), json.dumps({"op": "ack", "body": [1]}),
                 json.dumps({"op": "apply", "id": 5, "body": {}}), json.dumps({"op": "dance", "body": {}})):
        assert isinstance(edge.receive(junk), Ignored), junk
    assert edge.acked == 0


def test_what_the_relay_hears_and_sends_once_per_link() -> None:
    relay = RelayProtocol()
    up = relay.receive(envelope("up", "batch", {"items": rows(1, 2)}, message_id="f1"))
    assert isinstance(up, Up) and len(up.items) == 2
    assert json.loads(relay.ack(2, up))["parent"] == "f1"
    for junk, why in (("{", "malformed"), (json.dumps({"body": {}}), "malformed"),
                      (json.dumps({"op": "up", "body": {"items": "x"}}), "list of items"),
                      (json.dumps({"op": "up", "body": [1]}), "object")):
        event = relay.receive(junk)
        assert isinstance(event, Unusable) and why in event.reason, (junk, event)
        assert json.loads(relay.refusal(event))["op"] == "error"
        relay = RelayProtocol()
    refused = RelayProtocol()
    refused.refusal(Unusable("bad"))
    assert refused.receive(envelope("up", "batch", {"items": rows(3, 4)})) is None  # the link is ending: nothing more
    assert relay.receive(json.dumps({"op": "dance", "body": {}})) == Unknown("dance")
    queued = [{"id": "m1", "resource": "twin", "body": {"a": 1}}, {"id": "m2", "resource": "cmd", "body": {}}]
    assert [json.loads(f)["id"] for f in relay.to_send(queued)] == ["m1", "m2"]
    assert relay.to_send(queued) == []  # sent on this link: not again while it waits for the answer
    assert relay.receive(envelope("applied", "twin", {"ok": True}, parent="m1")) == Applied("m1", {"ok": True})
    assert relay.receive(envelope("applied", "twin", {"ok": True})) is None  # no parent: nothing to do
    assert RelayProtocol().to_send(queued[1:]) != []  # a new link sends what is still queued


def test_both_ends_over_a_lossy_breaking_link_lose_and_repeat_nothing() -> None:
    """The two protocols, an outbox and a relay store in memory, and a link that loses frames, breaks, and refuses:
    every row ends stored at the relay once and deleted at the edge only once stored; every down message is applied
    once however often it is sent."""
    rng = random.Random(7)
    for _ in range(30):
        outbox = {r["offset"]: r for r in rows(1, rng.randint(50, 400))}
        total = len(outbox)
        stored: dict[int, int] = {}  # offset -> times stored
        last = 0  # the relay's highest stored offset
        queue = {f"m{i}": {"id": f"m{i}", "resource": "twin", "body": {"n": i}} for i in range(rng.randint(1, 20))}
        sent_down = len(queue)
        applied_at_edge: dict[str, int] = {}
        edge = EdgeProtocol(batch_rows=rng.randint(1, 50), in_flight=rng.randint(1, 4))
        for _link in range(500):
            if not outbox and not queue:
                break
            relay = RelayProtocol()
            edge.connected()
            up_wire: list[str] = []
            down_wire: list[str] = [*relay.to_send(list(queue.values()))]
            for _step in range(rng.randint(1, 60)):
                if edge.window_open():
                    pending = [outbox[o] for o in sorted(outbox) if o > edge.sent][: edge.batch_rows]
                    if pending:
                        up_wire.append(edge.batch(pending))
                if up_wire and rng.random() < 0.8:
                    frame = up_wire.pop(0)
                    if relay.refused:  # the relay refused one and closes: the rest is not read
                        continue
                    if rng.random() < 0.05:  # a frame the relay cannot use: refused, the link ends
                        event = relay.receive("{broken")
                        assert isinstance(event, Unusable)
                        down_wire.append(relay.refusal(event))
                    else:
                        event = relay.receive(frame)
                        if event is None:  # after a refusal: the relay takes nothing more on this link
                            continue
                        assert isinstance(event, Up)
                        for item in event.items:
                            if item["offset"] > last:
                                stored[item["offset"]] = stored.get(item["offset"], 0) + 1
                                last = item["offset"]
                        down_wire.append(relay.ack(last, event))
                if down_wire and rng.random() < 0.8:
                    frame = down_wire.pop(0)
                    if rng.random() < 0.1:
                        continue  # lost with the link's buffers
                    heard = edge.receive(frame)
                    if isinstance(heard, Refused):
                        break
                    if isinstance(heard, Acked):
                        for o in [o for o in outbox if o <= heard.offset]:
                            assert o in stored  # deleted only once the relay has it
                            del outbox[o]
                    elif isinstance(heard, Apply):
                        applied_at_edge.setdefault(heard.message_id, 0)
                        applied_at_edge[heard.message_id] += 1
                        answer = relay.receive(edge.applied(heard, {"ok": True}))
                        if isinstance(answer, Applied) and rng.random() < 0.9:
                            queue.pop(answer.parent, None)
                if rng.random() < 0.03:
                    break  # the link breaks: what was in flight is gone
        assert not outbox and not queue
        assert sorted(stored) == list(range(1, total + 1)) and set(stored.values()) == {1}
        assert len(applied_at_edge) == sent_down  # each applied; a resent one the edge recognises by its id
