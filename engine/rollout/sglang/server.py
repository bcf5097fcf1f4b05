"""One SGLang server as a Ray actor: started as a subprocess on the actor's GPUs, or found at an
external address; checked for health; restarted and brought back to the current weights on request.

Guarantees: `start` returns only once GET /health answers 200 (or raises, with the end of the
server's log, when the process exits or server_start_timeout passes); `recover` returns the URL of a
healthy server that holds the last weights handed to `set_current` and reports their version, or
raises after inference.max_server_restarts restarts; `apply_distributed` returns the version the
server reports after its part of a weight-update-group push (engine/rollout/sglang/weight_sync.py).
The launch path needs sglang importable in the actor's Python; without it `start` fails with an error
saying so (the launcher can be replaced, inference.server_launcher, which is how tests start a
stand-in server that speaks the same HTTP contract).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import ray

from engine.cluster import free_port
from engine.errors import EngineError
from engine.rollout.sglang.http import ServerDown, ServerError, SglangHttp
from engine.rollout.sglang.server_args import server_command
from engine.rollout.sglang.tensors import serialize_named_tensors
from engine.rollout.sglang.weight_sync import PAUSE, distributed_bodies
from engine.weight_broadcast import LearnerHeld


class ServerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a server actor needs: the model, its tp size, the forwarded arguments and the timeouts."""

    model_path: str
    tp_size: int = 1
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    start_timeout: float = 900.0
    health_interval: float = 10.0
    health_timeout: float = 30.0
    max_restarts: int = 3
    # Program and module to run instead of `python -m sglang.launch_server` (same arguments).
    launcher: list[str] | None = None
    # A server started elsewhere: no process is started; recovery waits for it to answer again.
    external_url: str | None = None
    # The GPUs the server process sees (CUDA_VISIBLE_DEVICES, e.g. GPU UUIDs), where they are not just
    # the GPU Ray gives the actor: a colocated server spanning several learner GPUs.
    visible_devices: list[str] | None = None


def node_address() -> str:
    return ray.util.get_node_ip_address()


class SglangServerActor:
    """Ray actor (async) owning one server (created with `ray.remote(SglangServerActor).options(...)`)."""

    def __init__(self, spec: ServerSpec, index: int) -> None:
        self.spec, self.index = spec, index
        self.restarts = 0
        self.incarnation = 0
        self._proc: subprocess.Popen | None = None
        self._log = Path(tempfile.mkdtemp(prefix=f"sglang{index}-")) / "server.log"
        self._url = spec.external_url or ""
        self._http: SglangHttp | None = None
        self._current: tuple[list[Any], int] | None = None
        self._recovering = asyncio.Lock()

    # --- process ------------------------------------------------------------------------------------

    def command(self, port: int, version: int) -> list[str]:
        return server_command(
            model_path=self.spec.model_path,
            host=node_address(),
            port=port,
            tp_size=self.spec.tp_size,
            weight_version=version,
            args=self.spec.args,
            launcher=self.spec.launcher,
        )

    async def start(self, version: int = 0) -> str:
        """Start the server (or find the external one) and wait until it is healthy; returns its URL."""
        if self.spec.external_url is None:
            if self.spec.launcher is None and importlib.util.find_spec("sglang") is None:
                raise EngineError(
                    "inference.backend = 'sglang' starts `python -m sglang.launch_server`, but sglang is "
                    "not importable in the Ray workers' Python: install it (pip install sglang==0.5.9) "
                    "on the GPU nodes, or point inference.engine_urls at servers started elsewhere"
                )
            port = free_port("")
            cmd = self.command(port, version)
            env = dict(os.environ)
            if self.spec.visible_devices is not None:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(self.spec.visible_devices)
            with open(self._log, "ab") as log:
                self._proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
                )
            self._url = f"http://{node_address()}:{port}"
        await self._set_http(self._url)
        await self._wait_healthy()
        return self._url

    async def _set_http(self, url: str) -> None:
        if self._http is not None:
            await self._http.close()
        self._http = SglangHttp(url)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def _wait_healthy(self) -> None:
        assert self._http is not None
        deadline = time.monotonic() + self.spec.start_timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise EngineError(
                    f"sglang server {self.index} exited with status {self._proc.returncode} while "
                    f"starting; the end of its log ({self._log}):\n{self._log_tail()}"
                )
            if await self._http.healthy(timeout=self.spec.health_timeout):
                return
            if time.monotonic() > deadline:
                raise EngineError(
                    f"sglang server {self.index} at {self._url} did not answer GET /health within "
                    f"inference.server_start_timeout = {self.spec.start_timeout} s; the end of its log "
                    f"({self._log}):\n{self._log_tail()}"
                )
            await asyncio.sleep(min(1.0, self.spec.health_interval))

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)  # the server and its scheduler processes
            self._proc.wait()
        self._proc = None

    async def stop(self) -> None:
        self._kill()
        if self._http is not None:
            await self._http.close()

    # --- state --------------------------------------------------------------------------------------

    async def url(self) -> str:
        return self._url

    async def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def info(self) -> dict[str, Any]:
        return {"url": self._url, "restarts": self.restarts, "incarnation": self.incarnation}

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One HTTP call to the server (the weight sync's pause, update and memory calls go through here)."""
        assert self._http is not None, "start() first"
        return await self._http.call(method, path, body)

    async def set_current(self, buckets: list[Any], version: int) -> None:
        """The weights the engines hold now (ObjectRefs of HF-named buckets, or a LearnerHeld: the
        learner's host copy): what a restart reloads."""
        self._current = (buckets, version)

    async def apply_distributed(
        self, group: str, metas: list[Any], buckets: list[Any], version: int, mode: str
    ) -> int:
        """This server's part of a weight-update-group push (weight_sync.py): pause as `mode` says, one
        /update_weights_from_distributed per call of weight_sync.distributed_bodies while the sender
        broadcasts (`metas`: ObjectRefs of each bucket's names, dtypes and shapes), continue; the buckets
        become the current weights. Returns the version the server reports afterwards."""
        assert self._http is not None, "start() first"
        described = [await m if isinstance(m, ray.ObjectRef) else m for m in metas]
        pause = PAUSE.get(mode)
        if pause is not None:
            await self._http.pause(pause)
        try:
            for body in distributed_bodies(described, group, version, mode):
                await self._http.update("/update_weights_from_distributed", body)
        finally:
            if pause is not None:
                await self._http.resume_generation()
        self._current = (buckets, version)
        return int(await self._http.weight_version())

    # --- recovery -----------------------------------------------------------------------------------

    async def recover(self, seen_incarnation: int) -> tuple[str, int]:
        """Make the server answer again at the current weights; returns (url, incarnation).

        Callers pass the incarnation they saw fail: concurrent callers get one restart between them."""
        async with self._recovering:
            assert self._http is not None
            if self.incarnation != seen_incarnation or await self._http.healthy(
                timeout=self.spec.health_timeout
            ):
                return self._url, self.incarnation
            if self.restarts >= self.spec.max_restarts:
                raise EngineError(
                    f"sglang server {self.index} stopped answering after {self.restarts} restarts "
                    f"(inference.max_server_restarts = {self.spec.max_restarts}); its log: {self._log}"
                )
            self.restarts += 1
            version = self._current[1] if self._current is not None else 0
            if self.spec.external_url is None:
                self._kill()
                await self.start(version)
                await self._load_current()
            else:  # started elsewhere: wait for it, and it must come back at the current weights
                await self._wait_healthy()
                reported = await self._http.weight_version()
                if self._current is not None and reported != str(version):
                    raise EngineError(
                        f"external sglang server {self._url} came back at weight_version {reported!r}, "
                        f"but the run is at version {version}; restart it from the run's latest weights"
                    )
            self.incarnation += 1
            return self._url, self.incarnation

    async def _load_current(self) -> None:
        """Bring a fresh server to the current weights with /update_weights_from_tensor."""
        if self._current is None:
            return
        assert self._http is not None
        buckets, version = self._current
        for i, ref in enumerate(buckets):
            if isinstance(ref, LearnerHeld):  # colocated: the learner's host copy of that version
                ref = ref.fetch()
            bucket = await ref if isinstance(ref, ray.ObjectRef) else ref
            last = i == len(buckets) - 1
            await self._http.update(
                "/update_weights_from_tensor",
                {
                    "serialized_named_tensors": serialize_named_tensors(bucket, self.spec.tp_size),
                    "flush_cache": last,
                    "weight_version": str(version) if last else None,
                },
            )
        reported = await self._http.weight_version()
        if reported != str(version):
            raise ServerError(
                f"sglang server {self.index} reports weight_version {reported!r} after being brought "
                f"to version {version}"
            )


__all__ = ["ServerDown", "ServerSpec", "SglangServerActor"]
