"""The producer's InferenceEngine over one SGLang server (or a router in front of several).

Guarantees: each request is one streamed POST /generate with input_ids, its sampling parameters and
return_logprob; its result holds every output token with SGLang's log-prob for it and, per token, the
weight_version the server reported in the chunk that delivered it. Rids are sent as `<prefix><rid>.`,
so SGLang's prefix match in /abort_request never catches another request. A server that stops
answering is recovered through its server actor (restart at the current weights), and the requests
it was running are submitted again from their prompt: a request the producer handed over always
comes back, finished or aborted, unless recovery itself fails (then generate raises that error).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from engine.errors import EngineError
from engine.rollout.engines import InferenceEngine, aborted
from engine.rollout.sglang.http import ServerDown, SglangHttp
from engine.wire import FinishReason, GenerateRequest, GenerateResult

_clients = itertools.count()


def sampling_params(request: GenerateRequest) -> dict[str, Any]:
    p = request.params
    out: dict[str, Any] = {
        "max_new_tokens": p.max_new_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "top_k": p.top_k,
    }
    if p.stop_token_ids:
        out["stop_token_ids"] = list(p.stop_token_ids)
    if request.seed is not None:
        out["sampling_seed"] = request.seed
    return out


def finish_reason(meta: dict[str, Any], url: str) -> FinishReason | None:
    """SGLang's meta_info.finish_reason ({"type": "stop" | "length" | "abort", ...} or null) as ours.

    An abort that carries an HTTP status is the server refusing the request, not an abort we asked
    for: that is an error."""
    reason = meta.get("finish_reason")
    if reason is None:
        return None
    kind = reason.get("type")
    if kind == "abort" and reason.get("status_code") not in (None, 200):
        raise EngineError(f"{url}: request {meta.get('id')} refused: {reason.get('message')}")
    if kind not in ("stop", "length", "abort"):
        raise EngineError(f"{url}: unknown finish_reason {reason!r}")
    return kind


class SglangEngineClient(InferenceEngine):
    """Requests to one server URL; `server` is its SglangServerActor (None: nothing to recover)."""

    def __init__(self, url: str, server: Any | None = None, *, recover: bool = True) -> None:
        self.http = SglangHttp(url)
        self.server = server if recover else None
        self.prefix = f"c{next(_clients)}-"
        self.incarnation = 0
        self._live: set[int] = set()
        self._aborted: set[int] = set()
        self._recovery: asyncio.Lock | None = None
        self.resubmitted = 0

    def rid(self, rid: int) -> str:
        return f"{self.prefix}{rid}."

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    async def abort(self, rids: list[int]) -> None:
        self._aborted.update(rids)
        live = [rid for rid in rids if rid in self._live]
        answers = await asyncio.gather(
            *(self.http.abort(self.rid(rid)) for rid in live), return_exceptions=True
        )
        for answer in answers:
            # A server that is down cannot abort, but those requests' streams fail too, and _one
            # returns them aborted (it sees them in _aborted) instead of submitting them again.
            if isinstance(answer, BaseException) and not isinstance(answer, ServerDown):
                raise answer

    async def _one(self, request: GenerateRequest) -> GenerateResult:
        while True:
            if request.rid in self._aborted:
                self._aborted.discard(request.rid)
                return aborted(request)
            seen = self.incarnation
            self._live.add(request.rid)
            try:
                result = await self._stream(request)
            except ServerDown as e:
                await self._recover(seen, e)
                self.resubmitted += 1
                continue
            finally:
                self._live.discard(request.rid)
            self._aborted.discard(request.rid)
            return result

    async def _stream(self, request: GenerateRequest) -> GenerateResult:
        body = {
            "rid": self.rid(request.rid),
            "input_ids": list(request.prompt_ids),
            "sampling_params": sampling_params(request),
            "return_logprob": True,
            "logprob_start_len": -1,
        }
        tokens: list[int] = []
        logprobs: list[float] = []
        versions: list[int] = []
        async for chunk in self.http.generate_stream(body):
            meta = chunk["meta_info"]
            out = meta["output_token_logprobs"]  # cumulative: [[logprob, token_id, text|null], ...]
            version = int(meta["weight_version"])
            for logprob, token, _ in out[len(tokens) :]:
                tokens.append(int(token))
                logprobs.append(float(logprob))
                versions.append(version)
            reason = finish_reason(meta, self.http.url)
            if reason is not None:
                return GenerateResult(
                    rid=request.rid,
                    token_ids=tokens,
                    logprobs=logprobs,
                    versions=versions,
                    finish_reason=reason,
                )
        raise ServerDown(f"{self.http.url}: request {body['rid']} ended without a finish_reason")

    async def _recover(self, seen: int, error: ServerDown) -> None:
        if self.server is None:
            raise error
        if self._recovery is None:
            self._recovery = asyncio.Lock()
        async with self._recovery:
            if self.incarnation != seen:
                return  # another request of this client already recovered the server
            url, self.incarnation = await self.server.recover.remote(seen)
            if url != self.http.url:
                await self.http.close()
                self.http = SglangHttp(url)

    async def close(self) -> None:
        await self.http.close()
