"""Weight push from the learner to an embedded engine: CUDA IPC buckets on a shared GPU, NCCL broadcast
to an engine on another GPU, and the object-store path, for the Qwen2.5-0.5B shape in bf16.

A LearnerGroup of one CUDA rank (Megatron model, bf16) and an EmbeddedEngineActor (transformers model,
bf16) share one GPU (half of it each, as in colocated mode); with two GPUs visible, a second pair is
built with the learner and the engine on a GPU each (disaggregated placement). A push is what the
controller does: learner rank 0 exports its weights under HF names (gathering, un-fusing QKV and
gate/up) in buckets of inference.update_weight_buffer_size bytes, and the engine applies them as one
version. Timed from the export call to the engine's acknowledgement, median of --repeats pushes after
one untimed push:

- cuda_ipc: buckets stay in GPU memory, the engine maps them (engine/cuda_ipc.py) and copies on device;
- object_store: buckets copied to host memory, carried by Ray's object store, copied back to the GPU;
- broadcast (two GPUs): one NCCL group of learner rank 0 and the engine, one broadcast per bucket from
  the learner's device memory into the engine's (engine/weight_broadcast.py).

After each path the engine's weights are checked against the learner's export, tensor by tensor.

    python -m bench.weight_push_gpu [--shape 0.5b] [--bucket-mib 512] [--repeats 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS, markdown_table
from bench.gpu_report import write
from bench.learner_gpu import gpu_name
from bench.learner_worker import bench_spec, write_checkpoint


def build(ckpt: Path, share: float) -> tuple[Any, Any]:
    import ray

    from engine.cluster import actor_options, gpus_per_actor
    from engine.learner.config import PerfConfig
    from engine.learner.group import LearnerGroup
    from engine.rollout.config import InferenceConfig
    from engine.rollout.engines import EmbeddedEngineActor

    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    spec = bench_spec(ckpt, PerfConfig(), total_steps=10)
    learner = LearnerGroup(1, spec, gpu_share=share)
    engine = (
        ray.remote(EmbeddedEngineActor)
        .options(**actor_options(num_gpus=gpus_per_actor(share)))
        .remote(str(ckpt), InferenceConfig(dtype=dtype), 0, 4, {})
    )
    ray.get(engine.ready.remote())
    return learner, engine


def push(
    learner: Any, engine: Any, version: int, path: str, size: int, sender: Any = None
) -> dict[str, float]:
    import ray

    t0 = time.perf_counter()
    if path == "broadcast":  # the learner's broadcast returns once sent; the engine then applies
        applied, _ = sender.push(version, "wait")
        t1 = time.perf_counter()
        ray.get(applied)
        t2 = time.perf_counter()
        return {"total_ms": (t2 - t0) * 1e3, "export_ms": (t1 - t0) * 1e3, "apply_ms": (t2 - t1) * 1e3}
    if path == "cuda_ipc":
        ref = learner.export_shared_buckets(size)
    else:
        ref = learner.export_weight_buckets(size)
    t1 = time.perf_counter()
    ray.get(engine.update_weights.remote(ref, version, "wait"))
    t2 = time.perf_counter()
    return {"total_ms": (t2 - t0) * 1e3, "export_ms": (t1 - t0) * 1e3, "apply_ms": (t2 - t1) * 1e3}


def check(learner: Any, engine: Any) -> float:
    """The largest difference between the engine's weights and the learner's export."""
    import ray

    exported = ray.get(learner.export_weights())
    held = ray.get(engine.state_dict.remote())
    assert exported.keys() == held.keys(), sorted(set(exported) ^ set(held))[:5]
    return max(float((held[k].float().cpu() - v.float()).abs().max()) for k, v in exported.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="0.5b")
    parser.add_argument("--bucket-mib", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--broadcast-on-cpu", action="store_true", help="the broadcast pair over gloo (checks)"
    )
    args = parser.parse_args()

    import ray

    name = gpu_name()
    size = args.bucket_mib * 2**20
    payload: dict[str, Any] = {"gpu": name, "shape": args.shape, "bucket_bytes": size, "results": []}
    rows = []
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(args.shape, Path(tmp))
            gpus = torch.cuda.device_count()
            placements = [("shared GPU", 0.5, ["cuda_ipc", "object_store"] if gpus else ["object_store"])]
            if gpus >= 2 or args.broadcast_on_cpu:
                placements.append(("GPU each", 1.0 if gpus >= 2 else 0.0, ["broadcast", "object_store"]))
            for placement, share, paths in placements:
                learner, engine = build(Path(tmp), share)
                uuids = (learner.info[0]["gpu_uuid"], ray.get(engine.gpu_uuid.remote()))
                if gpus and (uuids[0] == uuids[1]) != (placement == "shared GPU"):
                    raise RuntimeError(f"Ray placed learner and engine on {uuids} for {placement!r}")
                exported = ray.get(learner.export_weights())
                nbytes = sum(t.numel() * t.element_size() for t in exported.values())
                sender = None
                if "broadcast" in paths:
                    from engine.weight_broadcast import BroadcastPush

                    sender = BroadcastPush(learner, [engine], size, "nccl" if gpus >= 2 else "gloo")
                version = 0
                for path in paths:
                    version += 1
                    push(learner, engine, version, path, size, sender)  # untimed: group, mapping, allocations
                    runs = []
                    for _ in range(args.repeats):
                        version += 1
                        runs.append(push(learner, engine, version, path, size, sender))
                    r = {
                        "path": path,
                        "placement": placement,
                        "bytes": nbytes,
                        **{k: round(statistics.median(x[k] for x in runs), 2) for k in runs[0]},
                        "runs": runs,
                        "max_abs_diff": check(learner, engine),
                    }
                    payload["results"].append(r)
                    print(json.dumps({k: v for k, v in r.items() if k != "runs"}), flush=True)
                    rows.append(
                        [path, placement, round(nbytes / 2**20), r["total_ms"], r["export_ms"], r["apply_ms"]]
                    )
                learner.shutdown()
                ray.kill(engine)
    finally:
        ray.shutdown()
    head = ["path", "placement", "MiB", "push ms (median)", "export / send ms", "engine apply ms"]
    table = markdown_table(head, rows)
    write(args.out, f"weight_push_{(name or 'cpu').split()[-1].lower()}", payload, table)
    print(table)


if __name__ == "__main__":
    main()
