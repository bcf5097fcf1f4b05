"""Before anything starts: check, and report in the log, everything a run reaches outside its own code
and machine-local defaults: user code named by import path, the remote reward server, and the sample
stream's address and CURVE keys.

Guarantee: each import path in the config resolves to something callable, rollout.rm_url (when set) is an
http(s) URL with a host and a valid port and no credentials, and CURVE key files load; otherwise a
ConfigError names the section, the key and the value. Each is logged with what it resolved to (the
source file and line of a function, the server's host and port, the address the sample socket binds).
"""

from __future__ import annotations

import inspect
import logging
import urllib.parse
from typing import Any

from engine.errors import ConfigError

log = logging.getLogger("engine.preflight")

IMPORT_PATHS = (
    ("rollout", "custom_rm_path"),
    ("rollout", "dynamic_sampling_filter_path"),
    ("rollout", "buffer_filter_path"),
    ("algo", "custom_loss_function_path"),
)


def check_import_path(path: str, section: str, key: str) -> str:
    """`path` names a callable; returns where it is defined (file:line), for the log."""
    from engine.rollout.rewards import load_object

    try:
        fn = load_object(path)
    except ConfigError as e:
        raise ConfigError(e.message, section=section, key=key) from None
    if not callable(fn):
        raise ConfigError(f"{path!r} is not callable", section=section, key=key)
    try:
        return f"{inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]}"
    except (OSError, TypeError):
        return "(source not available)"


def check_url(url: str, section: str, key: str) -> str:
    """An http(s) URL with a host, a valid port and no user:password part; returns host:port."""
    parts = urllib.parse.urlsplit(url)
    problem = None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        problem, port = f"has a bad port ({e})", 0
    if parts.scheme not in ("http", "https"):
        problem = "must start with http:// or https://"
    elif not parts.hostname:
        problem = "has no host"
    elif parts.username or parts.password:
        problem = "must not carry credentials (user:password@); they would be logged and sent in clear"
    elif any(c.isspace() for c in url):
        problem = "contains whitespace"
    if problem:
        raise ConfigError(f"{url!r} {problem}", section=section, key=key)
    return f"{parts.hostname}:{port}"


def preflight(config: Any) -> list[str]:
    """Check and log the config's outside reach; returns the report lines."""
    lines = []
    for section, key in IMPORT_PATHS:
        path = getattr(getattr(config, section), key)
        if path:
            lines.append(f"[{section}] {key} = {path} -> {check_import_path(path, section, key)}")
    if config.rollout.rm_url:
        where = check_url(config.rollout.rm_url, "rollout", "rm_url")
        lines.append(f"[rollout] rm_url = {config.rollout.rm_url} -> reward server at {where}")
    t = config.transport
    t.server_keys()  # a bad key file is an error naming its key
    t.client_keys()
    auth = "CURVE, authorized keys in " + str(t.curve_authorized_keys) if t.curve else "no authentication"
    lines.append(f"[transport] sample stream binds {t.bind_host} ({auth})")
    for line in lines:
        log.info("%s", line)
    return lines
