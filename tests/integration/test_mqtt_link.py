"""The controller's ingest link (transport/mqtt_link.py) against a real Mosquitto.

What the controller relies on: every heartbeat arrives whole and in order; what it publishes
(echoes, acknowledgements) reaches subscribers; a refused login is an error naming why; a
broker that goes silent (a partition) or away closes the link within 1.5 x keepalive, so the
subscriber reconnects and holds meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiomqtt
import pytest

from chaos.sim.proxy import ProxyMode, TcpProxy
from watchdog.transport.mqtt_link import IngestLink, LinkError, encode_publish

from .conftest import Mosquitto

pytestmark = [pytest.mark.asyncio, pytest.mark.broker, pytest.mark.timeout(60)]
DEADLINE_S = 10.0


def link_to(
    port: int,
    got: list[tuple[str, bytes]],
    filters: list[tuple[str, int]],
    keepalive_s: int = 5,
    arrived: asyncio.Event | None = None,
) -> IngestLink:
    def on_message(topic: str, payload: bytes) -> None:
        got.append((topic, payload))
        if arrived is not None:
            arrived.set()

    return IngestLink(
        host="127.0.0.1",
        port=port,
        tls=None,
        client_id=f"link-{time.time_ns()}",
        username=None,
        password=None,
        keepalive_s=keepalive_s,
        filters=filters,
        on_message=on_message,
    )


async def test_every_message_arrives_whole_and_in_order(
    mosquitto: Mosquitto,
) -> None:
    got: list[tuple[str, bytes]] = []
    arrived = asyncio.Event()
    link = link_to(mosquitto.port, got, [("p/heartbeat/+", 0), ("p/echo/me", 0)], arrived=arrived)
    await link.open()
    try:
        sent = [(f"p/heartbeat/node-{i % 7}", f'{{"seq":{i}}}'.encode() * 3) for i in range(3000)]
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="load") as load:
            for topic, payload in sent:
                await load.publish(topic, payload, qos=0)
            await load.publish("p/other/x", b"not subscribed", qos=0)
        assert link.publish(encode_publish("p/echo/me", b"echo-1"))
        async with asyncio.timeout(DEADLINE_S):
            # Two publishers: the broker orders each one's messages, not the two together.
            while ("p/echo/me", b"echo-1") not in got or len(got) < len(sent) + 1:
                arrived.clear()
                await arrived.wait()
    finally:
        link.close()
    heartbeats = [m for m in got if m[0] != "p/echo/me"]
    assert heartbeats == sent, "lost, reordered or changed messages"
    assert link.messages == len(sent) + 1


async def test_what_the_link_publishes_reaches_subscribers(mosquitto: Mosquitto) -> None:
    got: list[tuple[str, bytes]] = []
    link = link_to(mosquitto.port, got, [("p/heartbeat/+", 0)])
    await link.open()
    try:
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="agent") as agent:
            await agent.subscribe("p/ack/node-1", qos=0)
            batch = b"".join(
                encode_publish("p/ack/node-1", f"{i} boot".encode()) for i in range(50)
            )
            assert link.publish(batch)
            received = []
            async with asyncio.timeout(DEADLINE_S):
                async for message in agent.messages:
                    received.append(message.payload)
                    if len(received) == 50:
                        break
        assert received == [f"{i} boot".encode() for i in range(50)]
    finally:
        link.close()


async def test_a_refused_login_is_an_error_naming_why(
    make_mosquitto: Callable[..., Mosquitto],
) -> None:
    broker = make_mosquitto(allow_anonymous=False)
    link = link_to(broker.port, [], [("p/heartbeat/+", 0)])
    with pytest.raises(LinkError, match=r"not authorized|bad user name"):
        await link.open()
    assert link.closed.done()


async def test_a_silent_broker_closes_the_link_within_one_and_a_half_keepalives(
    mosquitto: Mosquitto,
) -> None:
    async with TcpProxy("127.0.0.1", mosquitto.port, name="cut") as proxy:
        link = link_to(proxy.port, [], [("p/heartbeat/+", 0)], keepalive_s=2)
        await link.open()
        proxy.set_mode(ProxyMode.BLACKHOLE)
        cut_at = time.monotonic()
        async with asyncio.timeout(DEADLINE_S):
            why = await link.closed
        took = time.monotonic() - cut_at
    assert "nothing from the broker" in why
    assert 2.0 <= took <= 3.0 + 1.0 + 0.5, took  # after 3 s of silence, checked every 1 s


async def test_a_broker_that_goes_away_closes_the_link(mosquitto: Mosquitto) -> None:
    link = link_to(mosquitto.port, [], [("p/heartbeat/+", 0)])
    await link.open()
    mosquitto.stop()
    async with asyncio.timeout(DEADLINE_S):
        why = await link.closed
    assert "connection" in why
    assert not link.publish(encode_publish("p/echo/me", b"x"))
