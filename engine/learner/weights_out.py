"""A learner rank's weights going out: HF-named exports, the buckets each weight push travels in, and
HF checkpoints.

Guarantee (every rank must call each method; they are collective): rank 0 gets the full model under HF
names, with TP shards, the experts of all expert-parallel ranks and all pipeline stages gathered and the
vocabulary padding removed, in one of the push forms: host tensors in Ray's object store
(`export_hf_buckets`), GPU buckets shared by CUDA IPC (`export_hf_shared`, engine/cuda_ipc.py), or one
broadcast per bucket over a weight group (`broadcast_weights`, engine/weight_broadcast.py; rank 0 then
holds the weights for engines restarted later), or SGLang's /update_weights_from_tensor payloads for
servers on rank 0's device (`export_tensor_payloads`: rank 0 keeps the tensors alive until
`drop_tensor_payloads`). `WeightsOut` is mixed into LearnerWorker, whose model,
layout and groups it reads.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from engine.cuda_ipc import plan
from engine.learner import hf_bridge, hf_moe, pipeline
from engine.learner.weights import bucketize, save_hf_checkpoint
from engine.weight_broadcast import send_buckets


class WeightsOut:
    """LearnerWorker's weights-out methods (see the module docstring)."""

    @torch.no_grad()
    def export_hf(self, on_device: bool = False) -> dict[str, torch.Tensor] | None:
        """Full HF-named weights on global rank 0, on the CPU or (on_device) where the model is (every
        rank must call this)."""
        params = dict(self.model.named_parameters())
        out: dict[str, torch.Tensor] = {}
        # Each pipeline stage's rank at global rank 0's place collects; the stages then send to rank 0.
        keep = self.tp_rank == 0 and self.dp_rank == 0 and self.cp_rank == 0
        maps = hf_bridge.stage_param_maps(self.shape, self.stage.rank, self.pp, self.ep_rank, tied_copy=False)
        for p in maps:
            local = params[p.megatron].detach().contiguous()
            if self.tp > 1:
                shards = [torch.empty_like(local) for _ in range(self.tp)]
                dist.all_gather(shards, local, group=self.tp_group)
            else:
                shards = [local]
            for q, q_shards in hf_moe.over_ep_ranks(p, shards, self.shape.moe, self.ep_group):
                if keep:
                    for name, tensor in zip(q.hf, hf_bridge.to_hf(q, q_shards, self.shape), strict=True):
                        out[name] = tensor.clone() if on_device else tensor.to("cpu", copy=True)
        if self.pp > 1:
            return pipeline.gather_to_rank0(out)
        return out if self.rank == 0 else None

    def export_hf_buckets(self, max_bytes: int) -> list[Any] | None:
        """export_hf cut into buckets of at most max_bytes (weights.bucketize), each put into Ray's object
        store on its own; rank 0 returns their ObjectRefs in order (every rank must call this)."""
        import ray

        tensors = self.export_hf()
        if tensors is None:
            return None
        return [ray.put(bucket) for bucket in bucketize(tensors, max_bytes)]

    def export_hf_shared(self, max_bytes: int) -> list[Any] | None:
        """export_hf kept on the GPU and cut into CUDA IPC buckets of at most max_bytes (engine/cuda_ipc.py):
        rank 0 returns their handles, which an engine on the same GPU maps without a host copy."""
        tensors = self.export_hf(on_device=True)
        if tensors is None:
            return None
        return self._shared.share(tensors, max_bytes)

    def weight_layout(self, max_bytes: int) -> list[Any] | None:
        """Rank 0: how its export is cut into broadcast buckets (engine/weight_broadcast.py; every rank
        must call this)."""
        tensors = self.export_hf(on_device=True)
        return None if tensors is None else plan(tensors, max_bytes)

    def broadcast_weights(self, group_name: str, layout: list[Any], version: int) -> int:
        """Every rank exports; rank 0 broadcasts the buckets over the weight group from device memory and
        holds them as `version` for engines restarted later; returns the bytes sent."""
        tensors = self.export_hf(on_device=True)
        if tensors is None:
            return 0
        self._held = (version, tensors)
        return send_buckets(self._sender().groups[group_name], layout, tensors)

    def held_weights(self, version: int) -> dict[str, torch.Tensor]:
        """Rank 0: a host copy of the weights last broadcast, which must be `version`."""
        if self._held is None or self._held[0] != version:
            held = None if self._held is None else self._held[0]
            raise RuntimeError(f"learner rank 0 holds the weights of version {held}, not {version}")
        return {name: t.cpu() for name, t in self._held[1].items()}

    def save_hf(self, path: str) -> str | None:
        """Write an HF checkpoint of the current weights (rank 0 writes; every rank must call this)."""
        tensors = self.export_hf()
        if self.rank != 0:
            return None
        assert tensors is not None
        return str(save_hf_checkpoint(tensors, self.hf_config, self.ckpt.hf_checkpoint, path))

    # --- weights to SGLang servers (rank 0 sends: engine/rollout/sglang/weight_group.py) -------------

    def _sender(self) -> Any:
        from engine.rollout.sglang.weight_group import WeightSender

        if not hasattr(self, "_weight_sender"):
            self._weight_sender = WeightSender()
        return self._weight_sender

    def join_weight_group(
        self, address: str, port: int, world_size: int, group_name: str, backend: str
    ) -> None:
        self._sender().join_weight_group(address, port, world_size, group_name, backend)

    def leave_weight_group(self, group_name: str) -> None:
        self._sender().leave_weight_group(group_name)

    def export_tensor_payloads(self, max_bytes: int, version: int, keep_host_copy: bool) -> list[str] | None:
        """Colocated SGLang servers (every rank must call this): rank 0 returns, per bucket of at most
        max_bytes, the serialized named tensors of /update_weights_from_tensor (CUDA IPC handles on a GPU,
        shared-memory files on the CPU: engine/rollout/sglang/tensors.py) and keeps the tensors until
        drop_tensor_payloads; with keep_host_copy it also holds a host copy as `version` (held_weights)
        for servers restarted later."""
        from engine.rollout.sglang.tensors import serialize_named_tensors

        tensors = self.export_hf(on_device=True)
        if tensors is None:
            return None
        if keep_host_copy:
            self._held = (version, {name: t.to("cpu", copy=True) for name, t in tensors.items()})
        self._payload_tensors = tensors
        return [serialize_named_tensors(bucket, 1)[0] for bucket in bucketize(tensors, max_bytes)]

    def drop_tensor_payloads(self) -> None:
        """The servers have loaded the last payloads: rank 0's device copy goes."""
        self._payload_tensors = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def describe_bucket(self, bucket: dict[str, torch.Tensor]) -> dict[str, list]:
        return self._sender().describe_bucket(bucket)

    def broadcast_bucket(self, group_name: str, bucket: dict[str, torch.Tensor]) -> int:
        return self._sender().broadcast_bucket(group_name, bucket)
