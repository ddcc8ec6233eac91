"""Decode steps replayed as CUDA graphs, one graph per batch-size bucket.

A decode step of a small batch is mostly host time: Python and a few hundred kernel launches per layer
stack, while the GPU waits. A CUDA graph records the step's launches once and replays them with one
call. Its inputs and outputs live in static buffers, so a batch of b sequences runs in the graph of the
smallest bucket >= b, padded with dummy sequences.

Padding is harmless to the real rows with the batch_invariant backend: every kernel gives a row the same
bits whatever the batch around it, so a request's logits are those of the eager, unpadded step (tested).
With the stock backend the padded batch is a different batch, and a real row may round differently: a
source of variance of its own, which the serving simulation measures.

The padding sequences all use one cache slot, `pad_slot`, which the caller keeps out of use (the engine
allocates one slot more than it serves). Its length is reset to zero at the start of every step, so a
dummy sequence is a one-token sequence at position 0 whose output is thrown away.

    graphs = DecodeGraphs(model, cache)                  # pad_slot: the cache's last slot
    logits = graphs.step(tokens, slots)                  # [b] tokens, [b] slots -> [b, V] fp32

On a CPU (or with graphs off) the same static-buffer step runs eagerly, which is what the CPU tests
compare with the ordinary forward.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from detmoe import kernels
from detmoe.moe.cache import KVCache
from detmoe.moe import layer as moe_layer
from detmoe.moe.model import MoETransformer
from detmoe.moe.routing import Routing

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def capture_blocker(model: MoETransformer, buckets: Sequence[int] = BUCKETS) -> Optional[str]:
    """Why the model's decode step cannot be captured in these buckets (None if it can): a capture needs
    a step without a host sync and whose real rows do not depend on the padding."""
    router = model.blocks[0].moe.router
    if router.drops:
        return (f"router {model.cfg.moe.router!r} can drop tokens: its kept count is read back (a host "
                "sync) and padding would change every expert's capacity")
    if router.stateful:
        return f"router {model.cfg.moe.router!r} carries a per-sequence state across steps"
    most = max(buckets) * model.cfg.moe.top_k
    if model.layout is not None and model.layout.experts == "ep" and most > moe_layer.EP_DEVICE_RUN_MAX:
        return (f"buckets up to {max(buckets)} sequences x top_k={model.cfg.moe.top_k} make {most} "
                f"assignments, past the {moe_layer.EP_DEVICE_RUN_MAX} that an expert-parallel layer places "
                "without a host sync (detmoe/moe/layer.py): use smaller buckets")
    return None


def graphs_by_default(model: MoETransformer) -> bool:
    """Whether `Engine` and `generate` capture decode steps when not told: on a CUDA device, where the
    step can be captured."""
    return model.device.type == "cuda" and capture_blocker(model) is None


def bucket_for(b: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds b sequences."""
    for size in buckets:
        if size >= b:
            return size
    raise ValueError(f"a decode batch of {b} sequences exceeds the largest bucket ({max(buckets)})")


@dataclass
class _Bucket:
    tokens: torch.Tensor                  # [size] static inputs
    slots: torch.Tensor
    cu_seqlens: torch.Tensor              # [size + 1]: one token per sequence, fixed
    logits: Optional[torch.Tensor] = None          # [size, V] static output (after capture)
    routings: Optional[list[Routing]] = None
    graph: Optional["torch.cuda.CUDAGraph"] = None


class DecodeGraphs:
    def __init__(self, model: MoETransformer, cache: KVCache, buckets: Sequence[int] = BUCKETS,
                 pad_slot: Optional[int] = None, capture: Optional[bool] = None):
        """capture: record CUDA graphs (default: when the model is on a CUDA device); False runs the
        static-buffer step eagerly. pad_slot: the slot the padding uses (default the cache's last)."""
        increasing = list(buckets) == sorted(set(buckets))
        if not buckets or not increasing or any(not isinstance(b, int) or b < 1 for b in buckets):
            raise ValueError(f"buckets must be increasing positive ints, got {buckets!r}")
        blocker = capture_blocker(model, buckets)
        if blocker is not None:
            raise ValueError(f"decode graphs cannot capture this model's step: {blocker}")
        self.pad_slot = cache.n_slots - 1 if pad_slot is None else pad_slot
        if not 0 <= self.pad_slot < cache.n_slots:
            raise ValueError(f"pad_slot must be a cache slot in 0..{cache.n_slots - 1}, got {pad_slot}")
        self.model, self.cache, self.buckets = model, cache, tuple(buckets)
        self.capture = model.device.type == "cuda" if capture is None else capture
        if self.capture and model.device.type != "cuda":
            raise ValueError("capture=True needs a model on a CUDA device")
        self._buckets: dict[tuple[int, str], _Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.routings: list[Routing] = []  # the last step's, padded rows included (rows [:b] are real)
        self.record_seconds = 0.0          # wall time spent recording graphs (warm-up and capture), in all

    def step(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One decode token for each of b sequences: tokens [b] go to cache slots [b]. The slots must be
        distinct and not pad_slot (checked when they are host tensors, as the engine's are) and have room
        for one more token (not checked: reading the lengths would cost a host sync; the engine admits
        only requests that fit, `generate` sizes its cache to fit). Returns the logits [b, V] fp32 (a copy:
        the static output is overwritten by the next step)."""
        b = tokens.shape[0]
        if tokens.dim() != 1 or slots.shape != (b,) or b == 0:
            raise ValueError(f"tokens and slots must be 1-D of one equal, non-zero length, got "
                             f"{tuple(tokens.shape)} and {tuple(slots.shape)}")
        if slots.device.type == "cpu":
            self._check_slots(slots.tolist())
        size, backend = bucket_for(b, self.buckets), kernels.get_backend().name
        bucket = self._buckets.get((size, backend)) or self._new_bucket(size, backend)
        bucket.tokens[b:] = 0
        bucket.slots[b:] = self.pad_slot
        bucket.tokens[:b] = tokens
        bucket.slots[:b] = slots
        if self.capture:
            if bucket.graph is None:
                self._record(bucket)
            bucket.graph.replay()
        else:
            bucket.logits, bucket.routings = self._run(bucket)
        self.routings = bucket.routings
        return bucket.logits[:b].clone()

    def _check_slots(self, slots: list[int]) -> None:
        if len(set(slots)) != len(slots) or self.pad_slot in slots or \
                not all(0 <= s < self.cache.n_slots for s in slots):
            raise ValueError(f"slots must be distinct cache slots in 0..{self.cache.n_slots - 1} other than "
                             f"pad_slot={self.pad_slot}, got {slots}")

    def _new_bucket(self, size: int, backend: str) -> _Bucket:
        dev = self.model.device
        bucket = _Bucket(tokens=torch.zeros(size, dtype=torch.long, device=dev),
                         slots=torch.full((size,), self.pad_slot, dtype=torch.long, device=dev),
                         cu_seqlens=torch.arange(size + 1, device=dev))
        self._buckets[(size, backend)] = bucket   # one graph per backend: each records its own kernels
        return bucket

    def _run(self, bucket: _Bucket) -> tuple[torch.Tensor, list[Routing]]:
        # the dummy sequences restart at position 0 every step (a zero_ kernel: `[i] = 0` would copy a
        # host scalar, which a capture refuses)
        self.cache.lengths[self.pad_slot:self.pad_slot + 1].zero_()
        return self.model.run_step(bucket.tokens, bucket.cu_seqlens, self.cache, bucket.slots)

    def _record(self, bucket: _Bucket) -> None:
        """Capture the bucket's step. The real inputs are set aside while the warm-up (which compiles
        kernels and allocates their workspaces outside the graph) and the capture run on padding alone,
        so that recording touches no real sequence's cache."""
        start = time.perf_counter()
        real_tokens, real_slots = bucket.tokens.clone(), bucket.slots.clone()
        bucket.slots.fill_(self.pad_slot)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(bucket)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            bucket.logits, bucket.routings = self._run(bucket)
        bucket.graph = graph
        bucket.tokens.copy_(real_tokens)
        bucket.slots.copy_(real_slots)
        torch.cuda.synchronize()
        self.record_seconds += time.perf_counter() - start
