"""SGLang 0.5.9's native HTTP endpoints as async calls (aiohttp), one object per server URL.

Guarantee: a server that cannot be reached (refused, reset, timed out, or gone mid-response) raises
ServerDown; one that answers with an error status raises ServerError with its message; nothing is
retried here (the client and the server actor decide what a failure means).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import aiohttp

from engine.errors import EngineError

PauseMode = Literal["abort", "retract", "in_place"]
DOWN = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError, ConnectionError)


class ServerDown(EngineError):
    """The server did not answer (or stopped answering in the middle of a response)."""


class ServerError(EngineError):
    """The server answered with an error status."""


class SglangHttp:
    """Calls to one SGLang server. Create and use inside one event loop; `close` when done."""

    def __init__(self, url: str, *, timeout: float | None = None) -> None:
        self.url = url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, connector=aiohttp.TCPConnector(limit=0)
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """One request; the JSON answer (or the text, for endpoints that answer in plain text)."""
        kwargs: dict[str, Any] = {"json": body} if body is not None else {}
        if timeout is not None:
            kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout)
        try:
            async with self._client().request(method, self.url + path, **kwargs) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise ServerError(f"{self.url}{path}: HTTP {resp.status}: {text[:500]}")
        except DOWN as e:
            raise ServerDown(f"{self.url}{path}: {type(e).__name__}: {e}") from e
        if resp.content_type == "application/json" and text:
            return json.loads(text)
        return text

    async def generate_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST /generate with stream = true: each `data:` chunk until `data: [DONE]`."""
        try:
            async with self._client().post(self.url + "/generate", json={**body, "stream": True}) as resp:
                if resp.status >= 400:
                    raise ServerError(f"{self.url}/generate: HTTP {resp.status}: {(await resp.text())[:500]}")
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise ServerError(f"{self.url}/generate: {chunk['error']}")
                    yield chunk
        except DOWN as e:
            raise ServerDown(f"{self.url}/generate: {type(e).__name__}: {e}") from e
        raise ServerDown(f"{self.url}/generate: the stream ended without [DONE]")

    async def healthy(self, *, generate: bool = False, timeout: float = 30.0) -> bool:
        """GET /health (or /health_generate, which runs a one-token generation): 200 means healthy."""
        try:
            await self.call("GET", "/health_generate" if generate else "/health", timeout=timeout)
        except (ServerDown, ServerError):
            return False
        return True

    async def model_info(self) -> dict[str, Any]:
        return await self.call("GET", "/model_info")

    async def weight_version(self) -> str:
        return str((await self.model_info())["weight_version"])

    async def abort(self, rid: str | None = None) -> None:
        """POST /abort_request for one rid (SGLang matches it as a prefix) or for all (rid None)."""
        await self.call("POST", "/abort_request", {"rid": rid} if rid is not None else {"abort_all": True})

    async def pause(self, mode: PauseMode) -> None:
        await self.call("POST", "/pause_generation", {"mode": mode})

    async def resume_generation(self) -> None:
        await self.call("POST", "/continue_generation", {})

    async def flush_cache(self) -> bool:
        """True if flushed (SGLang refuses with 400 while requests are running)."""
        try:
            await self.call("POST", "/flush_cache")
        except ServerError:
            return False
        return True

    async def release_memory(self, tags: list[str] | None = None) -> None:
        await self.call("POST", "/release_memory_occupation", {"tags": tags})

    async def resume_memory(self, tags: list[str] | None = None) -> None:
        await self.call("POST", "/resume_memory_occupation", {"tags": tags})

    async def update(self, path: str, body: dict[str, Any]) -> str:
        """A weight endpoint answering {"success", "message"}; a failure raises ServerError."""
        out = await self.call("POST", path, body)
        if not out.get("success"):
            raise ServerError(f"{self.url}{path}: {out.get('message')}")
        return str(out.get("message", ""))
