"""The sample stream: producer -> buffer over ZeroMQ PUSH/PULL; a message is one or more samples (a
group), one msgspec-encoded Sample per frame.

The transport sits behind two small interfaces so another one (shared memory, a different socket) can
replace it. Guarantees: frames are delivered in order per producer and are not dropped by ZeroMQ (PUSH
blocks at the high-water mark instead); sockets bind to loopback by default; a frame that does not decode
to a valid Sample is reported to the caller as a WireError, never passed on.
"""

from __future__ import annotations

import abc

import zmq
import zmq.asyncio

from engine.wire import Sample, decode_sample, encode_sample

DEFAULT_HWM = 10_000
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
    """An asyncio PUSH socket connected to the buffer (create it inside the event loop that uses it)."""

    def __init__(self, address: str, hwm: int = DEFAULT_HWM) -> None:
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, LINGER_MS)
        self._sock.connect(address)

    async def send(self, samples: list[Sample]) -> None:
        await self._sock.send_multipart([encode_sample(x) for x in samples], copy=False)

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
        if not self._poller.poll(timeout_ms):
            return None
        return [decode_sample(frame.buffer) for frame in self._sock.recv_multipart(copy=False)]

    def close(self) -> None:
        self._sock.close()
        self._ctx.term()
