"""The sample stream: producer -> buffer over ZeroMQ PUSH/PULL; a message is one or more samples (a
group), one msgspec-encoded Sample per frame.

The transport sits behind two small interfaces so another one (shared memory, a different socket) can
replace it. Guarantees:
- frames are delivered in order per producer and are not dropped by ZeroMQ (PUSH waits at the high-water
  mark instead), so a producer faster than the buffer is slowed down, never loses a sample;
- the buffer's socket binds to loopback unless [transport] bind_host names another address, which
  requires CURVE (engine/curve.py): then only producers holding an authorized key get anything through;
- a message that is not a valid sample (undecodable, wrong schema or version, bad values, over
  max_message_bytes) is reported to the caller as a WireError with a reason, never passed on.
"""

from __future__ import annotations

import abc
import asyncio
import ipaddress
from typing import Any

import msgspec
import zmq

from engine.configbase import Section
from engine.curve import (
    ClientKeys,
    ServerKeys,
    load_client_keys,
    load_server_keys,
    secure_client,
    secure_server,
)
from engine.errors import WireError
from engine.wire import Sample, decode_samples, encode_samples

DEFAULT_HWM = 1_000
BACKPRESSURE_POLL_S = 0.001
LINGER_MS = 5_000


class TransportConfig(Section, kw_only=True):
    """[transport]: the sample stream's address, authentication and bounds."""

    section_name = "transport"

    # Address the buffer binds its sample socket to. Anything but a loopback address needs curve = true.
    bind_host: str = "127.0.0.1"
    # CURVE encryption and authentication of the sample stream, with the key files below.
    curve: bool = False
    curve_server_secret_key: str | None = None  # the buffer's certificate (.key_secret)
    curve_authorized_keys: str | None = None  # directory of producer certificates (*.key) it accepts
    curve_client_secret_key: str | None = None  # the producer's certificate (.key_secret)
    curve_server_public_key: str | None = None  # the buffer's public certificate (.key)
    # Messages (groups) queued in ZeroMQ on each side before the producer waits.
    send_hwm: int = DEFAULT_HWM
    recv_hwm: int = DEFAULT_HWM
    # A message (all frames of one group) larger than this is rejected; a single larger frame makes
    # ZeroMQ drop the sender's connection before it is read into memory.
    max_message_bytes: int = 256 * 2**20
    # The buffer stops reading the socket while the samples it holds exceed this (ZeroMQ then holds the
    # producer back), except when the batch the learner waits for still misses samples.
    max_buffered_bytes: int = 2**30

    def check(self) -> None:
        self.positive("send_hwm", "recv_hwm", "max_message_bytes", "max_buffered_bytes")
        try:
            address = ipaddress.ip_address(self.bind_host)
        except ValueError:
            self.require(False, "bind_host", f"must be an IP address, got {self.bind_host!r}")
            return
        self.require(
            address.is_loopback or self.curve,
            "bind_host",
            f"{self.bind_host} is not a loopback address: binding it needs curve = true and the "
            "curve_* key files, so that only producers holding a key can send samples",
        )
        if self.curve:
            for key in (
                "curve_server_secret_key",
                "curve_authorized_keys",
                "curve_client_secret_key",
                "curve_server_public_key",
            ):
                self.require(bool(getattr(self, key)), key, "is required when curve = true")

    def server_keys(self) -> ServerKeys | None:
        """The buffer's CURVE keys (None without curve); a bad file is a ConfigError naming the key."""
        if not self.curve:
            return None
        return load_server_keys(self.curve_server_secret_key, self.curve_authorized_keys)

    def client_keys(self) -> ClientKeys | None:
        if not self.curve:
            return None
        return load_client_keys(self.curve_client_secret_key, self.curve_server_public_key)


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

    def __init__(self, address: str, cfg: TransportConfig | None = None) -> None:
        cfg = cfg or TransportConfig()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, cfg.send_hwm)
        self._sock.setsockopt(zmq.LINGER, LINGER_MS)
        keys = cfg.client_keys()
        if keys is not None:
            secure_client(self._sock, keys)
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


def wire_reason(frames: list[Any]) -> str:
    """Why a message failed to decode, for the rejection counters (called on the error path only)."""
    try:
        values = [msgspec.msgpack.decode(f) for f in frames]
    except (msgspec.DecodeError, ValueError):  # ValueError: a str that is not UTF-8
        return "undecodable"
    for value in values:
        if not isinstance(value, dict) or value.get("type") is None:
            return "wrong_schema"
        if value["type"] != "sample/1":
            return "wrong_version"
    return "wrong_schema"


class ZmqSampleSource(SampleSource):
    """A PULL socket bound to [transport] bind_host on a free port; `address` is what producers connect to."""

    def __init__(self, cfg: TransportConfig | None = None) -> None:
        cfg = cfg or TransportConfig()
        self._max_bytes = cfg.max_message_bytes
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, cfg.recv_hwm)
        self._sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
        self._sock.setsockopt(zmq.LINGER, 0)
        keys = cfg.server_keys()
        self._auth = None if keys is None else secure_server(self._ctx, self._sock, keys)
        self._sock.bind(f"tcp://{cfg.bind_host}:*")
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)

    def monitor(self) -> zmq.Socket:
        """A PAIR socket receiving this socket's connection events (zmq.utils.monitor), e.g. failed
        CURVE handshakes."""
        return self._sock.get_monitor_socket()

    def recv(self, timeout_ms: int) -> list[Sample] | None:
        try:  # a message is usually waiting: take it without a poll
            frames = self._sock.recv_multipart(flags=zmq.NOBLOCK)
        except zmq.Again:
            if not self._poller.poll(timeout_ms):
                return None
            frames = self._sock.recv_multipart()
        if sum(map(len, frames)) > self._max_bytes:
            size = sum(map(len, frames))
            raise WireError(
                f"a message of {size} bytes exceeds transport.max_message_bytes={self._max_bytes}",
                reason="too_large",
            )
        try:
            return decode_samples(frames)
        except WireError as e:
            if e.reason == "undecodable":
                raise WireError(str(e), reason=wire_reason(frames)) from None
            raise

    def close(self) -> None:
        self._sock.close()
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
