"""The `remote_rm` reward: an HTTP reward server, asked from the producer's event loop.

Wire contract: one POST per response to the URL with the JSON body
`{"prompt": str | null, "response": str, "label": ..., "metadata": {...}}`; a 2xx answer is a JSON number
or an object `{"reward": number}`. Guarantee: `RemoteReward.score` returns one float per response, in
order, each the server's answer; a request that times out (after `timeout` seconds), fails to connect or
gets a 5xx answer is retried up to `max_retries` times, waiting `backoff * 2**i` seconds before retry i;
a 4xx answer (not retried), a malformed answer or exhausted retries raise RewardError naming the URL,
the last status or timeout and the number of attempts. Nothing is swallowed. At most `concurrency`
requests are in flight; the HTTP session belongs to the event loop that first scores, and `close` is
safe from any thread, also once that loop is gone.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp

from engine.rollout.rewards.base import RewardError

DEFAULT_BACKOFF = 0.1  # seconds before the first retry, doubled at each further one


async def _closed_with_loop(session: aiohttp.ClientSession) -> AsyncGenerator[None, None]:
    """Suspended for the session's life: the loop's shutdown_asyncgens (asyncio.run's end) resumes it, so
    a session is closed with its loop even when nobody calls close() first."""
    try:
        yield
    finally:
        await session.close()


def _finish(guard: AsyncGenerator[None, None]) -> None:
    """Run a guard's finally where its session is closed already (nothing left to wait for)."""
    closing = guard.aclose()
    try:
        closing.send(None)
    except StopIteration:
        return
    closing.close()


class RemoteReward:
    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        max_retries: int = 3,
        concurrency: int = 64,
        backoff: float = DEFAULT_BACKOFF,
    ) -> None:
        self.url, self.timeout, self.max_retries = url, timeout, max_retries
        self.concurrency, self.backoff = concurrency, backoff
        self._session: aiohttp.ClientSession | None = None
        self._guard: AsyncGenerator[None, None] | None = None
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _client(self) -> tuple[aiohttp.ClientSession, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            self.close()  # a session of another (finished) loop cannot serve this one
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=self.concurrency),
            )
            self._slots, self._loop = asyncio.Semaphore(self.concurrency), loop
            self._guard = _closed_with_loop(self._session)
            await anext(self._guard)  # runs to its yield at once: no other request sees a half-built client
        assert self._slots is not None
        return self._session, self._slots

    async def score(
        self, prompt: str | None, responses: list[str], label: Any, metadata: dict
    ) -> list[float]:
        """The server's reward for each response; on the first failure the other requests are cancelled."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(
                        self.one({"prompt": prompt, "response": r, "label": label, "metadata": metadata})
                    )
                    for r in responses
                ]
        except ExceptionGroup as eg:
            raise eg.exceptions[0] from None
        return [t.result() for t in tasks]

    async def one(self, payload: dict[str, Any]) -> float:
        session, slots = await self._client()
        attempts = self.max_retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                async with slots, session.post(self.url, json=payload) as answer:
                    body = await answer.text()
                    if answer.status < 400:
                        return self._reward(body)
                    last = f"HTTP {answer.status} ({body[:200]!r})"
                    if answer.status < 500:
                        raise RewardError(
                            f"remote reward {self.url} answered {last}; a client error is not retried "
                            f"(1 attempt)"
                        )
            except TimeoutError:
                last = f"timeout after {self.timeout} s (rollout.rm_timeout)"
            except aiohttp.ClientError as e:
                last = f"connection error {e!r}"
        raise RewardError(
            f"remote reward {self.url} failed after {attempts} attempts "
            f"(rollout.rm_max_retries = {self.max_retries}); last: {last}"
        )

    def _reward(self, body: str) -> float:
        try:
            data = json.loads(body)
        except ValueError:
            data = body
        value = data.get("reward") if isinstance(data, dict) else data
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RewardError(
                f'remote reward {self.url} answered {body[:200]!r}; expected a number or {{"reward": number}}'
            )
        return float(value)

    def close(self) -> None:
        """Close the HTTP session: awaited on its loop when that loop runs in another thread or is idle;
        its connections closed at once when called on that loop; nothing left to do once the loop ended
        through asyncio.run (which closed the session). Safe to call twice."""
        session, loop, guard = self._session, self._loop, self._guard
        self._session = self._slots = self._loop = self._guard = None
        if session is None or loop is None or guard is None:
            return
        if not session.closed and not loop.is_closed():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is None and not loop.is_running():
                loop.run_until_complete(guard.aclose())
                return
            if running is not loop and loop.is_running():
                asyncio.run_coroutine_threadsafe(guard.aclose(), loop).result(timeout=30)
                return
        if not session.closed:  # on its own loop (cannot wait here), or its loop closed without shutdown
            connector = session.connector
            session.detach()
            if connector is not None:
                connector._close()  # closes every transport now; nothing is left to await
        _finish(guard)
