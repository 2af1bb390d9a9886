"""The ingest link's wire format (transport/mqtt_link.py): packets split from a byte stream
however it is cut, and what it sends, checked byte for byte against the MQTT 3.1.1 layout.
The link itself runs against a real Mosquitto in tests/integration/test_agent_mqtt.py and
test_mqtt_link.py."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from watchdog.transport.mqtt_link import (
    MAX_PACKET_BYTES,
    LinkError,
    PacketReader,
    encode_connect,
    encode_publish,
    encode_subscribe,
)


def test_a_publish_is_laid_out_as_mqtt_says() -> None:
    packet = encode_publish("a/b", b"xyz")
    assert packet == b"\x30\x08\x00\x03a/bxyz"
    assert encode_publish(b"a/b", b"xyz", retain=True) == b"\x31" + packet[1:]
    big = encode_publish("t", b"p" * 200)  # a two-byte remaining length
    assert big[:3] == b"\x30\xcb\x01" and len(big) == 3 + 203


def test_connect_and_subscribe_are_laid_out_as_mqtt_says() -> None:
    connect = encode_connect("cid", 5, "user", "pw")
    body = b"\x00\x04MQTT\x04\xc2\x00\x05" + b"\x00\x03cid" + b"\x00\x04user" + b"\x00\x02pw"
    assert connect == bytes((0x10, len(body))) + body
    assert encode_connect("cid", 5, None, None)[9] == 0x02  # clean session only
    sub = encode_subscribe(1, [("p/heartbeat/+", 0), ("p/echo/x", 1)])
    body = b"\x00\x01" + b"\x00\x0dp/heartbeat/+\x00" + b"\x00\x08p/echo/x\x01"
    assert sub == bytes((0x82, len(body))) + body


@settings(max_examples=200, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=400), min_size=1, max_size=20),
    cuts=st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=30),
)
def test_packets_come_out_whole_however_the_stream_is_cut(
    payloads: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(encode_publish(f"t/{i}", p) for i, p in enumerate(payloads))
    reader = PacketReader()
    got: list[tuple[int, bytes]] = []
    pos, i = 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        got += reader.feed(stream[pos : pos + step])
        pos += step
        i += 1
    assert [h for h, _ in got] == [0x30] * len(payloads)
    for i, ((_, body), payload) in enumerate(zip(got, payloads, strict=True)):
        n = struct.unpack("!H", body[:2])[0]
        assert body[2 : 2 + n].decode() == f"t/{i}" and body[2 + n :] == payload


def test_a_length_beyond_the_broker_limit_or_malformed_is_refused() -> None:
    over = MAX_PACKET_BYTES + 1
    length = bytes(((over % 128) | 0x80, ((over // 128) % 128) | 0x80, over // 16384))
    with pytest.raises(LinkError):
        PacketReader().feed(b"\x30" + length)
    with pytest.raises(LinkError):
        PacketReader().feed(b"\x30\xff\xff\xff\xff\x01")
    # An incomplete length is kept, not refused.
    reader = PacketReader()
    assert reader.feed(b"\x30\x80") == []
    assert reader.feed(b"\x01" + b"x" * 128) == [(0x30, b"x" * 128)]
