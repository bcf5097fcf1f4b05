"""Typed messages that cross process boundaries: samples (producer -> buffer -> learner) and the
generation contract between the producer and any inference engine.

Guarantee: a Sample encodes to msgpack with token ids, log-probs, versions and loss mask as raw
little-endian buffers (not lists of Python numbers), and decodes back bit for bit; a message that is not
a well-formed Sample of this schema version, or one whose reward or log-probs are not finite, fails to
decode with a WireError naming the sample.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import msgspec
import numpy as np

from engine.errors import WireError

Status = Literal["completed", "truncated", "aborted"]
FinishReason = Literal["stop", "length", "abort"]

TOKEN_DTYPE = np.dtype("<i4")
LOGPROB_DTYPE = np.dtype("<f4")
VERSION_DTYPE = np.dtype("<i4")
MASK_DTYPE = np.dtype("u1")


def pack(values: Any, dtype: np.dtype) -> bytes:
    """Values as a raw little-endian buffer of `dtype`."""
    return np.ascontiguousarray(values, dtype=dtype).tobytes()


def unpack(buf: bytes, dtype: np.dtype) -> np.ndarray:
    """A read-only array view over a raw buffer."""
    return np.frombuffer(buf, dtype=dtype)


class Sample(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag="sample/1"):
    """One response to one prompt, with everything the learner and the ledger need.

    `versions[i]` is the policy version that produced response token i (partial rollouts span
    versions); `loss_mask[i]` is 0 for response tokens the loss must ignore.
    """

    group_id: int
    index: int
    group_size: int
    prompt_index: int
    prompt_ids: bytes
    response_ids: bytes
    rollout_logprobs: bytes
    versions: bytes
    loss_mask: bytes
    reward: float
    status: Status
    label: str | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    response_text: str = ""
    # The batch this sample's group was assigned to; -1: the partial-rollout cache.
    batch: int = -1
    # The sampling seed of this response (a cached partial response resumes with it).
    seed: int = 0

    @classmethod
    def build(
        cls,
        *,
        prompt_ids: Any,
        response_ids: Any,
        rollout_logprobs: Any,
        versions: Any,
        loss_mask: Any = None,
        **fields: Any,
    ) -> Sample:
        n = len(response_ids)
        if loss_mask is None:
            loss_mask = np.ones(n, dtype=MASK_DTYPE)
        sample = cls(
            prompt_ids=pack(prompt_ids, TOKEN_DTYPE),
            response_ids=pack(response_ids, TOKEN_DTYPE),
            rollout_logprobs=pack(rollout_logprobs, LOGPROB_DTYPE),
            versions=pack(versions, VERSION_DTYPE),
            loss_mask=pack(loss_mask, MASK_DTYPE),
            **fields,
        )
        sample.validate()
        return sample

    @property
    def prompt_array(self) -> np.ndarray:
        return unpack(self.prompt_ids, TOKEN_DTYPE)

    @property
    def response_array(self) -> np.ndarray:
        return unpack(self.response_ids, TOKEN_DTYPE)

    @property
    def logprob_array(self) -> np.ndarray:
        return unpack(self.rollout_logprobs, LOGPROB_DTYPE)

    @property
    def version_array(self) -> np.ndarray:
        return unpack(self.versions, VERSION_DTYPE)

    @property
    def mask_array(self) -> np.ndarray:
        return unpack(self.loss_mask, MASK_DTYPE)

    @property
    def response_len(self) -> int:
        return len(self.response_ids) // TOKEN_DTYPE.itemsize

    def validate(self) -> None:
        """Raise WireError unless buffer sizes agree with each other and with the group fields.

        Plain integer arithmetic on buffer lengths: this runs for every sample the buffer receives."""
        n4 = len(self.response_ids)
        if (
            len(self.prompt_ids) % 4
            or n4 % 4
            or len(self.rollout_logprobs) != n4
            or len(self.versions) != n4
            or len(self.loss_mask) * 4 != n4
            or not 0 <= self.index < self.group_size
            or not math.isfinite(self.reward)
        ):
            problem = self._problem()
            raise WireError(problem, reason="non_finite" if "finite" in problem else "invalid_sample")
        logprobs = self.logprob_array
        bad = ~np.isfinite(logprobs)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise WireError(
                f"sample {self.group_id}/{self.index} (prompt {self.prompt_index}): rollout_logprobs[{i}] "
                f"is {float(logprobs[i])}, not finite",
                reason="non_finite",
            )

    def _problem(self) -> str:
        where = f"sample {self.group_id}/{self.index}"
        if len(self.prompt_ids) % 4 or len(self.response_ids) % 4:
            return f"{where}: token ids are not a whole number of int32"
        n = len(self.response_ids) // 4
        for name, size, width in (
            ("rollout_logprobs", len(self.rollout_logprobs), 4),
            ("versions", len(self.versions), 4),
            ("loss_mask", len(self.loss_mask), 1),
        ):
            if size != n * width:
                return f"{where}: {name} has {size / width:g} entries, response has {n}"
        if not 0 <= self.index < self.group_size:
            return f"{where}: index outside group of {self.group_size}"
        return f"{where} (prompt {self.prompt_index}): reward {self.reward} is not finite"


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Sample)


def encode_sample(sample: Sample) -> bytes:
    return _encoder.encode(sample)


def encode_samples(samples: list[Sample]) -> list[bytes]:
    """One frame per sample."""
    return list(map(_encoder.encode, samples))


def decode_sample(data: bytes | memoryview) -> Sample:
    """Decode and validate one sample; anything else raises WireError."""
    return decode_samples([data])[0]


def decode_samples(frames: list[bytes] | list[memoryview]) -> list[Sample]:
    """Decode and validate the samples of one message; anything else raises WireError.

    One pass of the decoder over the frames, then the checks: the receiving side of the sample stream
    runs this for every message, so it avoids per-sample call overhead."""
    try:
        samples = list(map(_decoder.decode, frames))
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
        # ValueError: msgspec raises UnicodeDecodeError for a str that is not UTF-8
        raise WireError(f"not a valid sample: {e!r}", reason="undecodable") from None
    for sample in samples:
        sample.validate()
    return samples


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-request sampling. temperature 0 is greedy; top_k -1 and top_p 1.0 are off."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = ()


class GenerateRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One generation: prompt token ids plus sampling. `rid` is unique per request within a producer;
    `seed` fixes the request's random draws (None: the engine picks one). A request resumed after an
    abort sends prompt + the tokens so far, the remaining budget, and sample_offset = tokens so far."""

    rid: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    seed: int | None = None
    # Position of the first token drawn in the seed's stream: a resumed request continues its stream.
    sample_offset: int = 0


class GenerateResult(msgspec.Struct, kw_only=True):
    """Response tokens with, per token, log softmax(logits / temperature) of the sampled token and the
    policy version that produced it."""

    rid: int
    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: FinishReason
