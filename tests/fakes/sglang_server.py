"""A stand-in SGLang 0.5.9 server: its HTTP endpoints and JSON, with the embedded engine generating.

Run as `python -m tests.fakes.sglang_server --model-path P --host H --port N [--weight-version V] ...`
(other SGLang arguments are accepted and ignored). What it reproduces, from SGLang 0.5.9's
http_server.py, io_struct.py and tokenizer_manager.py:
- /generate: GenerateReqInput fields (unknown fields and sampling parameters are refused with 400),
  streamed (`data: {...}` chunks, then `data: [DONE]`) or not; meta_info with id, finish_reason
  ({"type": "stop", "matched"} / {"type": "length", "length"} / {"type": "abort", "message",
  "status_code", "err_type"}), prompt_tokens, completion_tokens, cached_tokens, weight_version and,
  with return_logprob, output_token_logprobs as cumulative [logprob, token_id, null] triples;
- /abort_request {"rid"} (prefix match, as SGLang's scheduler does) or {"abort_all": true};
- /pause_generation {"mode": "abort" | "in_place" | "retract"} and /continue_generation: new requests
  wait while paused; "abort" aborts what runs, the others stop decoding and keep the requests;
- the model-update lock: a weight update while not paused waits until no request is in flight;
- /init_weights_update_group, /update_weights_from_distributed (one broadcast per name, in order,
  from rank 0), /update_weights_from_tensor, /destroy_weights_update_group, /get_weights_by_name;
  flush_cache after an update while requests run fails (SGLang asserts there);
- /release_memory_occupation and /resume_memory_occupation with SGLang's tags ("kv_cache", "weights",
  "cuda_graph"; none given means all three). SGLang asserts in its scheduler that nothing is running
  when memory is released, and fails on resuming a tag that is not released; both are answered here
  with HTTP 500. A /generate that reaches a server whose weights or KV cache are released (SGLang would
  run on unmapped memory and crash) is refused with 400 and recorded. Weight loads from tensors are
  refused while the weights are released (SGLang would write into unmapped memory);
- /flush_cache (400 while requests run); /health, /health_generate, /model_info, /get_model_info,
  /server_info, /get_server_info.
Not SGLang endpoints: /fake/received (the weight names received, in order, the tags released, the
requests in flight, and the event log: pause, continue, release, resume, weight updates with their
version, and generation starts) and /fake/hold_updates ({"hold": true} makes weight updates that
set a weight_version wait after loading their tensors and before answering, until {"hold": false}:
tests use it to order events).
Updates that set a weight_version are recorded with the sha256 of every parameter; with --event-log
PATH (an option of the stand-in, not of SGLang) each event is also appended to PATH as a JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from aiohttp import web

from engine.rollout.hf_engine import DecodeBatch, HFEngine
from engine.rollout.sglang import tensors as tensor_payload
from engine.rollout.sglang.weight_group import join_group, receive
from engine.wire import GenerateRequest, SamplingParams

VERSION = "0.5.9"
GENERATE_FIELDS = {  # GenerateReqInput (io_struct.py) and its BaseReq fields
    "text", "input_ids", "input_embeds", "image_data", "video_data", "audio_data", "sampling_params",
    "return_logprob", "logprob_start_len", "top_logprobs_num", "token_ids_logprob",
    "return_text_in_logprobs", "stream", "log_metrics", "return_hidden_states", "return_routed_experts",
    "routed_experts_start_len", "modalities", "session_params", "lora_path", "lora_id",
    "custom_logit_processor", "bootstrap_host", "bootstrap_port", "bootstrap_room", "bootstrap_pair_key",
    "decode_tp_size", "require_reasoning", "data_parallel_rank", "background", "conversation_id",
    "priority", "extra_key", "routing_key", "no_logs", "custom_labels", "return_bytes", "return_entropy",
    "external_trace_header", "need_wait_for_image", "num_items_assigned", "max_dynamic_patch",
    "min_dynamic_patch", "image_max_dynamic_patch", "video_max_dynamic_patch", "rid", "http_worker_ipc",
}  # fmt: skip
SAMPLING_FIELDS = {  # SamplingParams.__init__ (sampling/sampling_params.py)
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
    "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "no_stop_trim", "custom_params", "stream_interval", "logit_bias",
    "sampling_seed",
}  # fmt: skip
ALL_MEMORY = ["kv_cache", "weights", "cuda_graph"]  # constants.GPU_MEMORY_ALL_TYPES
SUPPORTED_SAMPLING = {"max_new_tokens", "stop_token_ids", "temperature", "top_p", "top_k", "sampling_seed"}


def matches(rid: str, prefix: str | None) -> bool:
    return prefix is None or rid.startswith(prefix)


def error(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


@dataclass
class Req:
    rid: str
    request: GenerateRequest
    prompt_tokens: int
    chunks: asyncio.Queue = field(default_factory=asyncio.Queue)
    sent: int = 0
    done: bool = False


class FakeSglang:
    def __init__(self, args: argparse.Namespace) -> None:
        torch.set_num_threads(1)
        self.args = args
        self.engine = HFEngine(args.model_path, seed=args.random_seed or 0)
        self.weight_version = args.weight_version
        self.engine.version = int(args.weight_version) if args.weight_version.isdigit() else 0
        self.params = dict(self.engine.model.named_parameters())
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.pending: deque[Req] = deque()
        self.running: list[tuple[DecodeBatch, list[Req]]] = []  # decoding side by side
        self.reqs: dict[str, Req] = {}
        self.ids = 0
        self.aborts: list[str | None] = []
        self.wake = asyncio.Event()
        self.paused = False  # new requests wait (tokenizer manager's is_pause)
        self.engine_paused = False  # decoding stopped (in_place / retract)
        self.pause_cond = asyncio.Condition()
        self.in_flight = 0  # requests holding the model-update reader lock
        self.lock_cond = asyncio.Condition()
        self.writer = False
        self.model_lock = asyncio.Lock()  # decode steps and weight loads take turns
        self.groups: dict[str, Any] = {}
        self.released: set[str] = set()
        self.received: list[str] = []
        self.events: list[list[Any]] = []
        self.refused_while_released = 0
        self.hold = asyncio.Event()
        self.hold.set()  # set: weight updates answer at once

    # --- decode loop ---------------------------------------------------------------------------------

    def _emit(self, req: Req, tokens: list[int], logprobs: list[float], reason: str | None) -> None:
        if len(tokens) == req.sent and reason is None:
            return
        req.sent = len(tokens)
        finish = None
        if reason == "stop":
            finish = {"type": "stop", "matched": tokens[-1]}
        elif reason == "length":
            finish = {"type": "length", "length": len(tokens)}
        elif reason == "abort":
            finish = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
        meta = {
            "id": req.rid,
            "finish_reason": finish,
            "prompt_tokens": req.prompt_tokens,
            "weight_version": self.weight_version,
            "total_retractions": 0,
            "completion_tokens": len(tokens),
            "cached_tokens": 0,
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, tokens, strict=True)],
            "input_token_logprobs": [],
        }
        req.chunks.put_nowait({"text": "", "output_ids": list(tokens), "meta_info": meta})
        if finish is not None:
            req.done = True
            self.reqs.pop(req.rid, None)

    def _apply_aborts(self) -> None:
        for prefix in self.aborts:
            for req in [r for r in self.pending if matches(r.rid, prefix)]:
                self.pending.remove(req)
                self._emit(req, [], [], "abort")
            for batch, reqs in self.running:
                batch.abort({r.request.rid for r in reqs if matches(r.rid, prefix)})
        self.aborts.clear()

    def _emit_batches(self) -> None:
        for batch, reqs in self.running:
            for i, req in enumerate(reqs):
                if not req.done:
                    self._emit(req, batch.tokens[i], batch.logprobs[i], batch.reasons[i])
        self.running = [(b, reqs) for b, reqs in self.running if not all(r.done for r in reqs)]

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._apply_aborts()
            self._emit_batches()
            if self.engine_paused or not (self.running or self.pending):
                self.wake.clear()
                await self.wake.wait()
                continue
            async with self.model_lock:  # new requests start a batch of their own; then one step each
                if self.pending:
                    reqs = list(self.pending)
                    self.pending.clear()
                    requests = [r.request for r in reqs]
                    batch = await loop.run_in_executor(self.executor, self.engine.start, requests)
                    self.running.append((batch, reqs))
                for batch, _ in self.running:
                    await loop.run_in_executor(self.executor, batch.step)

    def busy(self) -> bool:
        return bool(self.pending or self.running)

    # --- the model-update lock (a reader per request, a writer per weight update) --------------------

    async def read_acquire(self) -> None:
        async with self.lock_cond:
            await self.lock_cond.wait_for(lambda: not self.writer)
            self.in_flight += 1

    async def read_release(self) -> None:
        async with self.lock_cond:
            self.in_flight -= 1
            self.lock_cond.notify_all()

    async def updating(self, fn: Any) -> Any:
        """Run a weight update: at once while paused, else once no request is in flight."""
        if self.paused:
            return await fn()
        async with self.lock_cond:
            await self.lock_cond.wait_for(lambda: not self.writer)
            self.writer = True
            await self.lock_cond.wait_for(lambda: self.in_flight == 0)
        try:
            return await fn()
        finally:
            async with self.lock_cond:
                self.writer = False
                self.lock_cond.notify_all()

    # --- handlers ------------------------------------------------------------------------------------

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        unknown = sorted(set(body) - GENERATE_FIELDS)
        if unknown:
            return error(f"unknown GenerateReqInput fields {unknown}")
        sp = body.get("sampling_params") or {}
        if set(sp) - SAMPLING_FIELDS:
            return error(
                f"SamplingParams got unexpected keyword arguments {sorted(set(sp) - SAMPLING_FIELDS)}"
            )
        if set(sp) - SUPPORTED_SAMPLING:
            return error(f"the stand-in server does not implement {sorted(set(sp) - SUPPORTED_SAMPLING)}")
        ids = body.get("input_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
            return error("input_ids must be one non-empty list of token ids (batches are not implemented)")
        async with self.pause_cond:
            await self.pause_cond.wait_for(lambda: not self.paused)
        if self.released & {"weights", "kv_cache"}:
            self.refused_while_released += 1
            self.record(["generate_refused", sorted(self.released)])
            return error(f"memory released ({sorted(self.released)}): generation would fail", 400)
        await self.read_acquire()
        try:
            self.record(["generate"])
            self.ids += 1
            rid = str(body.get("rid") or f"fake{self.ids}")
            params = SamplingParams(
                max_new_tokens=sp.get("max_new_tokens", 128),
                temperature=sp.get("temperature", 1.0),
                top_p=sp.get("top_p", 1.0),
                top_k=sp.get("top_k", -1),
                stop_token_ids=tuple(sp.get("stop_token_ids") or ()),
            )
            req = Req(rid, GenerateRequest(rid=self.ids, prompt_ids=tuple(ids), params=params,
                                           seed=sp.get("sampling_seed")), len(ids))  # fmt: skip
            self.reqs[rid] = req
            self.pending.append(req)
            self.wake.set()
            if not body.get("stream"):
                while True:
                    chunk = await req.chunks.get()
                    if chunk["meta_info"]["finish_reason"] is not None:
                        return web.json_response(chunk)
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            while True:
                chunk = await req.chunks.get()
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                if chunk["meta_info"]["finish_reason"] is not None:
                    break
            await resp.write(b"data: [DONE]\n\n")
            return resp
        finally:
            await self.read_release()

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("abort_all"):
            self.aborts.append(None)
        elif body.get("rid") in self.reqs:  # a known rid; the scheduler aborts every rid it prefixes
            self.aborts.append(body["rid"])
        self.wake.set()
        return web.Response(status=200)

    async def pause_generation(self, request: web.Request) -> web.Response:
        mode = (await request.json()).get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            return error(f"Invalid mode: {mode!r}. Expected one of ['abort', 'retract', 'in_place'].")
        async with self.pause_cond:
            self.paused = True
        self.record(["pause", mode])
        if mode == "abort":
            self.aborts.append(None)
            self.wake.set()
            async with self.lock_cond:  # until every aborted request has answered
                await self.lock_cond.wait_for(lambda: self.in_flight == 0)
        else:
            async with self.model_lock:  # the step in progress ends first
                self.engine_paused = True
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        async with self.pause_cond:
            self.paused = False
            self.engine_paused = False
            self.pause_cond.notify_all()
        self.record(["continue"])
        self.wake.set()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def flush_cache(self, request: web.Request) -> web.Response:
        text = (
            "Cache flushed.\nPlease check backend logs for more details. (When there are running or "
            "waiting requests, the operation will not be performed.)\n"
        )
        return web.Response(text=text, status=400 if self.busy() else 200)

    def _load(self, named: list[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in named:
            if name not in self.params:
                raise KeyError(f"unknown parameter {name}")
            if tuple(tensor.shape) != tuple(self.params[name].shape):
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(self.params[name].shape)}")
        with torch.no_grad():
            for name, tensor in named:
                self.params[name].copy_(tensor)
        self.received += [name for name, _ in named]

    async def _finish_update(self, body: dict[str, Any], kind: str) -> web.Response:
        version = body.get("weight_version")
        if version is not None:
            await self.hold.wait()
            self.record([kind, version, self.digests()])
        else:
            self.record([kind, None])
        if body.get("flush_cache", True) and self.busy():
            return web.json_response(
                {"success": False, "message": "Cache flush failed after updating weights"}, status=400
            )
        message = "Succeeded to update parameter online."
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])
            self.engine.version = int(self.weight_version) if self.weight_version.isdigit() else 0
            message += f" Weight version updated to {self.weight_version}."
        return web.json_response({"success": True, "message": message})

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        b = await request.json()
        rank = b["rank_offset"]  # + tp_rank 0
        loop = asyncio.get_running_loop()
        try:
            group = await loop.run_in_executor(
                None, join_group, b["master_address"], b["master_port"], rank, b["world_size"],
                b.get("group_name", "weight_update_group"), b.get("backend", "nccl"),
            )  # fmt: skip
        except Exception as e:  # answered to the caller, as SGLang does
            return web.json_response({"success": False, "message": f"Failed: {e}."}, status=400)
        self.groups[b.get("group_name", "weight_update_group")] = group
        return web.json_response(
            {"success": True, "message": "Succeeded to initialize custom process group."}
        )

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        name = (await request.json()).get("group_name", "weight_update_group")
        if name not in self.groups:
            return web.json_response(
                {"success": False, "message": "The group to be destroyed does not exist."}, status=400
            )
        torch.distributed.destroy_process_group(self.groups.pop(name))
        return web.json_response({"success": True, "message": "Succeeded to destroy custom process group."})

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        b = await request.json()
        name = b.get("group_name", "weight_update_group")
        if name not in self.groups:
            return web.json_response(
                {"success": False, "message": f"Group {name} not initialized"}, status=400
            )
        if b.get("abort_all_requests"):
            self.aborts.append(None)
            self.wake.set()

        async def update() -> web.Response:
            loop = asyncio.get_running_loop()
            named = await loop.run_in_executor(
                None, receive, self.groups[name], b["names"], b["dtypes"], b["shapes"]
            )
            async with self.model_lock:
                self._load(named)
            return await self._finish_update(b, "update_distributed")

        return await self.updating(update)

    async def update_weights_from_tensor(self, request: web.Request) -> web.Response:
        b = await request.json()
        if "weights" in self.released:
            return web.json_response({"success": False, "message": "weights are released"}, status=400)

        async def update() -> web.Response:
            named = tensor_payload.deserialize(b["serialized_named_tensors"][0])  # tp rank 0
            async with self.model_lock:
                self._load([(n, t.clone()) for n, t in named])
            return await self._finish_update(b, "update_tensor")

        return await self.updating(update)

    async def get_weights_by_name(self, request: web.Request) -> web.Response:
        b = await request.json()
        values = self.params[b["name"]].detach().flatten()[: b.get("truncate_size", 100)]
        return web.json_response(values.tolist())

    async def release_memory_occupation(self, request: web.Request) -> web.Response:
        tags = (await request.json()).get("tags") or ALL_MEMORY
        if self.busy() or self.in_flight:  # the scheduler's assertion
            self.record(["release_refused", sorted(tags)])
            return error("release_memory_occupation should be called only when no ongoing request.", 500)
        self.released |= set(tags)
        self.record(["release", sorted(tags)])
        return web.json_response(None)

    async def resume_memory_occupation(self, request: web.Request) -> web.Response:
        tags = (await request.json()).get("tags") or ALL_MEMORY
        if set(tags) - self.released:  # the scheduler's offload_tags.remove raises
            return error(f"KeyError: {sorted(set(tags) - self.released)} are not released", 500)
        self.released -= set(tags)
        self.record(["resume", sorted(tags)])
        return web.json_response(None)

    def record(self, event: list[Any]) -> None:
        self.events.append(event)
        if self.args.event_log:
            with open(self.args.event_log, "a") as f:
                f.write(json.dumps(event) + "\n")

    def digests(self) -> dict[str, str]:
        """sha256 of every parameter's bytes: what a test compares with the learner's weights."""
        return {
            name: hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for name, t in self.params.items()
        }

    async def hold_updates(self, request: web.Request) -> web.Response:
        if (await request.json())["hold"]:
            self.hold.clear()
        else:
            self.hold.set()
        return web.json_response({"hold": not self.hold.is_set()})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def model_info(self, request: web.Request) -> web.Response:
        cfg = self.engine.config
        return web.json_response(
            {
                "model_path": self.args.model_path,
                "tokenizer_path": self.args.model_path,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": self.weight_version,
                "has_image_understanding": False,
                "has_audio_understanding": False,
                "model_type": cfg.model_type,
                "architectures": cfg.architectures,
            }
        )

    async def server_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {**vars(self.args), "weight_version": self.weight_version, "version": VERSION}
        )

    async def fake_received(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "names": self.received,
                "released": sorted(self.released),
                "in_flight": self.in_flight,
                "events": self.events,
                "refused_while_released": self.refused_while_released,
            }
        )


def app_for(server: FakeSglang) -> web.Application:
    app = web.Application(client_max_size=2**30)
    s = server
    app.router.add_route("POST", "/generate", s.generate)
    app.router.add_route("PUT", "/generate", s.generate)
    app.router.add_post("/abort_request", s.abort_request)
    app.router.add_post("/pause_generation", s.pause_generation)
    app.router.add_post("/continue_generation", s.continue_generation)
    for method in ("GET", "POST"):
        app.router.add_route(method, "/flush_cache", s.flush_cache)
        app.router.add_route(method, "/release_memory_occupation", s.release_memory_occupation)
        app.router.add_route(method, "/resume_memory_occupation", s.resume_memory_occupation)
        app.router.add_route(method, "/get_weights_by_name", s.get_weights_by_name)
    app.router.add_post("/init_weights_update_group", s.init_weights_update_group)
    app.router.add_post("/destroy_weights_update_group", s.destroy_weights_update_group)
    app.router.add_post("/update_weights_from_distributed", s.update_weights_from_distributed)
    app.router.add_post("/update_weights_from_tensor", s.update_weights_from_tensor)
    for path in ("/health", "/health_generate"):
        app.router.add_get(path, s.health)
    for path in ("/model_info", "/get_model_info"):
        app.router.add_get(path, s.model_info)
    for path in ("/server_info", "/get_server_info"):
        app.router.add_get(path, s.server_info)
    app.router.add_get("/fake/received", s.fake_received)
    app.router.add_post("/fake/hold_updates", s.hold_updates)
    return app


async def serve(args: argparse.Namespace) -> None:
    server = FakeSglang(args)
    runner = web.AppRunner(app_for(server))
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    await server.run()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--weight-version", default="default")
    parser.add_argument("--random-seed", type=int, default=None)
    parser.add_argument("--event-log", default=None)  # the stand-in's own: events as JSON lines
    args, _ = parser.parse_known_args()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
