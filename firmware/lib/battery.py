# Battery mode: the board deep-sleeps between readings. Each wake takes one reading into the flash buffer; every
# `send_every` readings (and after a power-on) it joins the Wi-Fi, sends what is buffered in batches, takes the acks,
# any desired-state change and the commands its gateway held for it, says when it wakes next, and sleeps again.
# What survives the sleep: the buffer and its acks on flash; the boot and its seq in RTC memory (a wake goes on with
# the boot it slept in, so the readings of several wakes go in one batch); the clock (the RTC keeps counting).
import asyncio
import json
import time

import machine

AWAKE_MAX_MS = 20000  # a session that takes longer gives up (the readings stay buffered for the next one)
LINGER_MS = 300  # quiet this long after the last message from the gateway: nothing more is coming


async def session(node, cfg, period):
    """One session with the gateway: greet, send until everything is acknowledged and the gateway is quiet."""
    link = node.link
    if not await link.wifi():
        return False
    client = link.client_factory()
    client.on_message = node.on_message
    client.on_oversize = node.on_oversize
    await client.connect()
    link.client = client
    reader = asyncio.create_task(client.run())
    sender = None
    try:
        await node.greet(client, node.reset_cause != "deep sleep")  # meta after a power-on; the gateway keeps it
        sender = asyncio.create_task(node.send(client))
        started = time.ticks_ms()
        while client.connected and time.ticks_diff(time.ticks_ms(), started) < AWAKE_MAX_MS:
            if (not node.buffer.unacked() and not node.running and node.ota is None
                    and time.ticks_diff(time.ticks_ms(), node.heard) > LINGER_MS):
                break
            await asyncio.sleep_ms(20)
        # retained like `online`: whoever looks later sees the board asleep, and until when
        # when it is next online: after `send_every` more readings (those of a wake that stays offline do not count)
        wake_in = period * max(1, cfg.get("send_every", 1) - node.buffer.unacked())
        await client.publish(node.root + "status", json.dumps({"state": "asleep", "wake_in": wake_in}), qos=1,
                             retain=True)
        await client.disconnect()  # a clean goodbye: the broker does not publish the will (`offline`)
        return True
    finally:
        if sender is not None:
            sender.cancel()
        reader.cancel()
        await client.close()
        link.client = None


async def wake(node):
    """A battery board's whole life between two deep sleeps."""
    cfg = node.cfg.get("battery") or {}
    period = node.twin.get("period", 10)
    node.take_reading()
    rtc = machine.RTC()
    rtc.memory(json.dumps([node.boot, node.seq, node.misses]))  # the next wake goes on from here (lost with the power)
    sent = False
    # no gateway at the last tries (Wi-Fi or gateway down): try again after twice as many readings each time, up to
    # 16 times as many, so an outage does not cost a 10 s Wi-Fi search at every wake (readings stay on flash)
    every = cfg.get("send_every", 1) * min(16, 2 ** node.misses)
    if node.reset_cause != "deep sleep" or node.buffer.unacked() >= every:
        try:
            sent = await session(node, cfg, period)
        except Exception as e:
            print("session failed:", repr(e))
        node.misses = 0 if sent else min(node.misses + 1, 4)
        rtc.memory(json.dumps([node.boot, node.seq, node.misses]))
    node.buffer.flush()  # the acks to flash: RTC memory would do on a real board, the buffer is on flash anyway
    awake = time.ticks_diff(time.ticks_ms(), node.woke)
    print("[battery] awake %d ms%s; sleeping %g s" % (awake, ", sent" if sent else "", period))
    machine.deepsleep(max(100, int(period * 1000) - awake))  # a wake every `period`, however long this one took
