"""The floor of reading heartbeats in Python: a bare subscriber to compare the controller with.

Same broker, same load, and one of two clients (`--client`): `link`, the controller's own
ingest link (transport/mqtt_link.py, what its heartbeats are read with), or `paho`, aiomqtt over
paho-mqtt (what they were read with before, and what the agents use). It only receives each
heartbeat and decodes its JSON, the least any subscriber must do, in the cheapest way the
client allows: each message handled in the client's read callback (for paho a queue type that
queues nothing), as the controller does, not through aiomqtt's message iterator (a task per
message, which alone costs about as much again). Run as
its own process (`python -m chaos.bench.floor URL PREFIX --warmup S --seconds S`): after the
warm-up it counts messages and its own CPU time for the window and prints one JSON line
`{"messages", "seconds", "cpu_s", "cpu_s_per_1000"}`. `bench ingest` runs it under the load
before starting the controller and reports the controller's CPU per heartbeat as a ratio to
this one, so a machine's speed cancels out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiomqtt


class _Window:
    """Counts decoded messages and CPU time over a window after a warm-up."""

    def __init__(self, warmup_s: float, seconds: float) -> None:
        self.warmup_s, self.seconds = warmup_s, seconds
        self.start = time.monotonic()
        self.counted = 0
        self.t0 = self.c0 = self.t1 = self.c1 = 0.0
        self.counting = False
        self.done = asyncio.Event()

    def __call__(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        assert isinstance(payload, bytes)
        self.raw(message.topic.value, payload)

    def raw(self, topic: str, payload: bytes) -> None:
        json.loads(payload)
        now = time.monotonic()
        if self.done.is_set():
            return
        if self.counting:
            self.counted += 1
            if now - self.t0 >= self.seconds:
                self.t1, self.c1 = now, time.process_time()
                self.done.set()
        elif now - self.start >= self.warmup_s:
            self.counting, self.t0, self.c0 = True, now, time.process_time()


async def measure(
    url: str, prefix: str, warmup_s: float, seconds: float, client: str = "paho"
) -> dict[str, float]:
    rest = url.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    window = _Window(warmup_s, seconds)
    if client == "link":
        from watchdog.transport.mqtt_link import IngestLink

        link = IngestLink(
            host=host,
            port=int(port),
            tls=None,
            client_id=f"bench-floor-{time.time_ns()}",
            username=None,
            password=None,
            keepalive_s=10,
            filters=[(f"{prefix}/heartbeat/+", 0)],
            on_message=window.raw,
        )
        await link.open()
        try:
            await window.done.wait()
        finally:
            link.close()
        return _result(window)

    class Inline(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            window(item)

    identifier = f"bench-floor-{time.time_ns()}"
    async with aiomqtt.Client(host, int(port), identifier=identifier, queue_type=Inline) as c:
        await c.subscribe(f"{prefix}/heartbeat/+", qos=0)
        await window.done.wait()
    return _result(window)


def _result(window: _Window) -> dict[str, float]:
    counted, t0, c0, t1, c1 = window.counted, window.t0, window.c0, window.t1, window.c1
    span = t1 - t0
    return {
        "messages": counted,
        "seconds": round(span, 2),
        "messages_per_s": round(counted / span, 1) if span else 0.0,
        "cpu_s": round(c1 - c0, 3),
        "cpu_cores": round((c1 - c0) / span, 3) if span else 0.0,
        "cpu_s_per_1000": round((c1 - c0) / counted * 1000, 4) if counted else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos.bench.floor")
    p.add_argument("url", help="mqtt://host:port")
    p.add_argument("prefix", help="topic prefix, e.g. watchdog")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before counting")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the counted window")
    p.add_argument("--client", choices=("link", "paho"), default="link", help="which client")
    a = p.parse_args(argv)
    result = asyncio.run(measure(a.url, a.prefix, a.warmup, a.seconds, a.client))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
