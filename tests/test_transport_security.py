"""The sample socket's security: loopback by default, CURVE when asked (required off loopback), and a peer
without the key gets nothing through. 127.0.0.2 (routed over lo on Linux) stands for the other address,
with curve = true as the explicit setting."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from engine.errors import ConfigError
from engine.transport import TransportConfig, ZmqSampleSink, ZmqSampleSource
from engine.wire import encode_samples
from tests.helpers import sample

HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def keys(tmp_path: Path) -> dict[str, str]:
    """Server, client and intruder certificates; only the client's public key is authorized."""
    d = tmp_path / "keys"
    d.mkdir()
    for name in ("server", "client", "intruder"):
        zmq.auth.create_certificates(d, name)
    allowed = tmp_path / "authorized"
    allowed.mkdir()
    (allowed / "client.key").write_bytes((d / "client.key").read_bytes())
    return {
        "server_secret": str(d / "server.key_secret"),
        "server_public": str(d / "server.key"),
        "client_secret": str(d / "client.key_secret"),
        "intruder_secret": str(d / "intruder.key_secret"),
        "authorized": str(allowed),
    }


def curve_config(
    k: dict[str, str], host: str = "127.0.0.2", client: str = "client_secret"
) -> TransportConfig:
    cfg = TransportConfig(
        bind_host=host,
        curve=True,
        curve_server_secret_key=k["server_secret"],
        curve_authorized_keys=k["authorized"],
        curve_client_secret_key=k[client],
        curve_server_public_key=k["server_public"],
    )
    cfg.check()
    return cfg


def test_default_binds_loopback_only() -> None:
    source = ZmqSampleSource()
    try:
        assert source.address.startswith("tcp://127.0.0.1:")
    finally:
        source.close()


def test_another_address_needs_curve_and_key_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[transport\] bind_host: 0.0.0.0 is not a loopback address"):
        TransportConfig(bind_host="0.0.0.0").check()
    with pytest.raises(ConfigError, match=r"\[transport\] bind_host: must be an IP address"):
        TransportConfig(bind_host="buffer.example").check()
    with pytest.raises(ConfigError, match=r"\[transport\] curve_server_secret_key: is required"):
        TransportConfig(bind_host="10.1.2.3", curve=True).check()
    k = keys(tmp_path)
    bad = tmp_path / "bad.key_secret"
    bad.write_text("not a certificate\n")
    cfg = curve_config(k)
    with pytest.raises(
        ConfigError, match=r"\[transport\] curve_server_secret_key: cannot read .*bad.key_secret"
    ):
        TransportConfig(**{**_fields(cfg), "curve_server_secret_key": str(bad)}).server_keys()
    with pytest.raises(
        ConfigError, match=r"\[transport\] curve_client_secret_key: .* does not hold a public and"
    ):
        TransportConfig(**{**_fields(cfg), "curve_client_secret_key": k["server_public"]}).client_keys()


def _fields(cfg: TransportConfig) -> dict:
    return {f: getattr(cfg, f) for f in cfg.__struct_fields__}


def test_a_peer_without_the_key_gets_nothing_through(tmp_path: Path) -> None:
    k = keys(tmp_path)
    source = ZmqSampleSource(curve_config(k))
    monitor = source.monitor()
    assert source.address.startswith("tcp://127.0.0.2:")
    ctx = zmq.Context()
    intruders = []
    try:
        # 1. no CURVE at all; 2. CURVE with a key the server does not know; 3. the right client key but
        # the wrong server key. Each pushes 50 samples (group ids 1000+).
        plain = ctx.socket(zmq.PUSH)
        unknown = ctx.socket(zmq.PUSH)
        intruder_public, intruder_secret = zmq.auth.load_certificate(k["intruder_secret"])
        unknown.curve_publickey, unknown.curve_secretkey = intruder_public, intruder_secret
        unknown.curve_serverkey = zmq.auth.load_certificate(k["server_public"])[0]
        wrong_server = ctx.socket(zmq.PUSH)
        client_public, client_secret = zmq.auth.load_certificate(k["client_secret"])
        wrong_server.curve_publickey, wrong_server.curve_secretkey = client_public, client_secret
        wrong_server.curve_serverkey = intruder_public
        intruders = [plain, unknown, wrong_server]
        for sock in intruders:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(source.address)
        for i in range(50):
            for j, sock in enumerate(intruders):
                with contextlib.suppress(zmq.Again):  # no connection came up: queued nowhere
                    sock.send_multipart(encode_samples([sample(1000 + 100 * j + i)]), flags=zmq.NOBLOCK)
        # The server refuses each intruder's handshake (seen on its monitor socket).
        failures = 0
        while failures < 3:
            event = recv_monitor_message(monitor)
            if event["event"] & HANDSHAKE_FAILED:
                failures += 1
        # The authorized producer's samples all arrive, and nothing else does.
        sink = ZmqSampleSink(source.address, curve_config(k))

        async def send() -> None:
            for i in range(20):
                await sink.send([sample(i)])

        asyncio.run(send())
        received = []
        while len(received) < 20:
            got = source.recv(timeout_ms=10_000)
            assert got is not None, f"only {len(received)} of 20 authorized samples arrived"
            received += [x.group_id for x in got]
        for _ in range(5):  # anything an intruder had got through would be queued by now
            got = source.recv(timeout_ms=200)
            received += [x.group_id for x in got or []]
        assert received == list(range(20))
        sink.close()
    finally:
        for sock in intruders:
            sock.close()
        ctx.term()
        monitor.close()
        source.close()
