"""The sample stream: producer -> buffer over ZeroMQ PUSH/PULL; a message is one or more samples (a
group), one msgspec-encoded Sample per frame.

The transport sits behind two small interfaces so another one (shared memory, a different socket) can
replace it. Guarantees: frames are delivered in order per producer and are not dropped by ZeroMQ (PUSH
blocks at the high-water mark instead); sockets bind to loopback by default; a frame that does not decode
to a valid Sample is reported to the caller as a WireError, never passed on.
"""

from __future__ import annotations

import abc
import asyncio

import zmq

from engine.wire import Sample, decode_samples, encode_samples

DEFAULT_HWM = 10_000
BACKPRESSURE_POLL_S = 0.001
LINGER_MS = 5_000


class SampleSink(abc.ABC):
    """Where a producer sends finished samples."""

    @abc.abstractmethod
    async def send(self, samples: list[Sample]) -> None:
        """Send samples as one message (all or nothing)."""

    @abc.abstractmethod
    def close(self) -> None: ...


class SampleSource(abc.ABC):
    """Where the buffer reads samples from."""

    address: str

    @abc.abstractmethod
    def recv(self, timeout_ms: int) -> list[Sample] | None:
        """The next message's samples, None after timeout_ms without one; WireError if any frame is bad."""

    @abc.abstractmethod
    def close(self) -> None: ...


class ZmqSampleSink(SampleSink):
    """A PUSH socket connected to the buffer, used from an asyncio event loop.

    A send goes straight to ZeroMQ's queue without blocking; only when the queue is at its high-water
    mark (the buffer is behind) does the coroutine wait, polling, until there is room again. Nothing is
    dropped and the event loop never blocks.
    """

    def __init__(self, address: str, hwm: int = DEFAULT_HWM) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, LINGER_MS)
        self._sock.connect(address)
        self.backpressure_waits = 0

    async def send(self, samples: list[Sample]) -> None:
        frames = encode_samples(samples)
        while True:
            try:
                self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                self.backpressure_waits += 1
                await asyncio.sleep(BACKPRESSURE_POLL_S)

    def close(self) -> None:
        self._sock.close()
        self._ctx.term()


class ZmqSampleSource(SampleSource):
    """A PULL socket bound to `host` on a free port; `address` is what producers connect to."""

    def __init__(self, host: str = "127.0.0.1", hwm: int = DEFAULT_HWM) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(f"tcp://{host}:*")
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)

    def recv(self, timeout_ms: int) -> list[Sample] | None:
        try:  # a message is usually waiting: take it without a poll
            frames = self._sock.recv_multipart(flags=zmq.NOBLOCK)
        except zmq.Again:
            if not self._poller.poll(timeout_ms):
                return None
            frames = self._sock.recv_multipart()
        return decode_samples(frames)

    def close(self) -> None:
        self._sock.close()
        self._ctx.term()
