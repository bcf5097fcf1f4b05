"""Backpressure: a producer pushing 10x what the learner consumes keeps the buffer's memory bounded and
loses nothing. The buffer is a real Ray actor; its anonymous resident memory (/proc/<pid>/status) is
sampled while the flood runs."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from engine.buffer.buffer import BufferActor, batch_digest
from engine.transport import TransportConfig, ZmqSampleSink
from tests.helpers import sample

GROUPS, N, TOKENS = 2, 4, 32_768  # a group: 4 samples of 32k tokens, about 1.6 MiB on the wire
CONSUMED = 4  # batches the learner takes while the producer tries to push 10x as many
CAP = 16 * 2**20
BOUND = 96 * 2**20  # stated bound on the growth of the buffer's anonymous resident memory


def rss_anon(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc status")


def group(b: int, g: int) -> list:
    gid = b * GROUPS + g
    return [sample(gid, i, N, n=TOKENS, reward=float(i), batch=b) for i in range(N)]


def test_flood_keeps_buffer_memory_bounded_and_loses_nothing(ray_local) -> None:
    ray = ray_local
    cfg = TransportConfig(send_hwm=2, recv_hwm=2, max_buffered_bytes=CAP)
    buffer = ray.remote(BufferActor).options(num_cpus=0, max_concurrency=4).remote(GROUPS, None, cfg)
    address, pid = ray.get([buffer.address.remote(), buffer.pid.remote()])
    base = rss_anon(pid)
    total = 10 * CONSUMED
    sink = ZmqSampleSink(address, cfg)
    sent = [0]

    def flood() -> None:
        async def push() -> None:
            for b in range(total):
                for g in range(GROUPS):
                    await sink.send(group(b, g))
                    sent[0] += 1

        asyncio.run(push())

    producer = threading.Thread(target=flood)
    producer.start()
    peak = 0
    for b in range(CONSUMED):  # the learner: 1 batch for every 10 pushed
        samples, _ = ray.get(buffer.get_batch.remote(b))
        assert len(samples) == GROUPS * N
        peak = max(peak, rss_anon(pid))
    # The producer is held back (its sends wait at the high-water mark), not buffered without bound.
    while sink.backpressure_waits < 200:
        peak = max(peak, rss_anon(pid))
        time.sleep(0.01)
    held = ray.get(buffer.stats.remote())
    peak = max(peak, rss_anon(pid))
    assert sent[0] < total * GROUPS and held["receiver_pauses"] > 0
    assert held["held_bytes"] <= CAP + GROUPS * N * (5 * TOKENS * 4)  # at most one group past the cap
    assert peak - base < BOUND, f"buffer grew by {(peak - base) / 2**20:.0f} MiB"
    # Then the learner catches up: every pushed batch arrives, whole and unchanged.
    for b in range(CONSUMED, total):
        samples, _ = ray.get(buffer.get_batch.remote(b))
        expected = [x for g in range(GROUPS) for x in group(b, g)]
        assert batch_digest(samples) == batch_digest(expected)
    producer.join()
    stats = ray.get(buffer.stats.remote())
    assert stats["received"] == total * GROUPS * N and not stats["rejected"] and not stats["invalid_frames"]
    print(f"flood: {total * GROUPS * N} samples, buffer peak +{(peak - base) / 2**20:.1f} MiB anon RSS")
    sink.close()
    ray.get(buffer.close.remote())
    ray.kill(buffer)
