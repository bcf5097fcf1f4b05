"""ZeroMQ CURVE for the sample stream: key files, server and client socket setup, and the authenticator.

Guarantee: a socket set up by `secure_server` accepts a connection only from a peer that completes the
CURVE handshake with the server's public key and whose own public key is one of the certificates in the
authorized-keys directory (checked by a ZAP authenticator in the socket's context); any other peer (no
CURVE, another server key, an unknown client key) gets no message through. Key files are ZeroMQ
certificates as written by `zmq.auth.create_certificates` (`public-key = "..."`, and `secret-key` in
the `.key_secret` file); a missing or malformed file is a ConfigError naming the [transport] key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from engine.errors import ConfigError

log = logging.getLogger(__name__)
ZAP_DOMAIN = "engine.samples"


@dataclass(frozen=True)
class ServerKeys:
    """The buffer's side: its own key pair and the directory of client certificates it accepts."""

    public: bytes
    secret: bytes
    authorized_dir: str


@dataclass(frozen=True)
class ClientKeys:
    """The producer's side: its own key pair and the server's public key."""

    public: bytes
    secret: bytes
    server_public: bytes


def load_key_file(path: str | None, key: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) from a certificate file; the error names [transport] `key` and the file."""
    if not path:
        raise ConfigError("is required when curve = true", section="transport", key=key)
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        message = f"cannot read a CURVE certificate from {path!r}: {e}"
        raise ConfigError(message, section="transport", key=key) from None
    if len(public) != 40 or (secret and (secret_key is None or len(secret_key) != 40)):
        what = "a public and a secret key" if secret else "a public key"
        raise ConfigError(
            f"{path!r} does not hold {what} (40-character Z85 each)", section="transport", key=key
        )
    return public, secret_key


def load_server_keys(secret_file: str | None, authorized_dir: str | None) -> ServerKeys:
    public, secret = load_key_file(secret_file, "curve_server_secret_key", secret=True)
    if not authorized_dir or not Path(authorized_dir).is_dir():
        raise ConfigError(
            f"must be a directory of client certificates (*.key), got {authorized_dir!r}",
            section="transport",
            key="curve_authorized_keys",
        )
    if not list(Path(authorized_dir).glob("*.key")):
        raise ConfigError(
            f"{authorized_dir!r} holds no client certificate (*.key): no producer could connect",
            section="transport",
            key="curve_authorized_keys",
        )
    assert secret is not None
    return ServerKeys(public, secret, authorized_dir)


def load_client_keys(secret_file: str | None, server_public_file: str | None) -> ClientKeys:
    public, secret = load_key_file(secret_file, "curve_client_secret_key", secret=True)
    server_public, _ = load_key_file(server_public_file, "curve_server_public_key", secret=False)
    assert secret is not None
    return ClientKeys(public, secret, server_public)


def secure_server(ctx: zmq.Context, sock: zmq.Socket, keys: ServerKeys) -> ThreadAuthenticator:
    """Make `sock` (not bound yet) a CURVE server that admits only the authorized client keys; returns
    the running authenticator, which the caller stops when it closes the socket."""
    auth = ThreadAuthenticator(ctx, log=log)
    auth.start()
    auth.configure_curve(domain=ZAP_DOMAIN, location=keys.authorized_dir)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
    return auth


def secure_client(sock: zmq.Socket, keys: ClientKeys) -> None:
    """Make `sock` (not connected yet) a CURVE client of the server with keys.server_public."""
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
