"""A small MoE decoder: embedding -> n_layers x [RMSNorm, RoPE attention, RMSNorm, MoE] -> RMSNorm ->
LM head. It takes a ragged batch (cu_seqlens as in varlen attention), so one step can mix prefill
chunks and decode tokens of different sequences, as a continuous-batching server does. No padding
enters any computation; all math goes through `kernels` and so through the backend switch.

Legend: T = tokens in the step, B = sequences, D = d_model, V = vocab.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from detmoe import kernels
from detmoe.moe.attention import Attention
from detmoe.moe.cache import KVCache
from detmoe.moe.config import ModelConfig
from detmoe.moe.layer import MoELayer
from detmoe.moe.parallel import Layout, shards_of, size_of
from detmoe.moe.routing import Routing
from detmoe.moe.step import Step


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, layout: Optional[Layout] = None):
        super().__init__()
        self.layer, self.eps = layer, cfg.norm_eps
        self.attn_norm = nn.Parameter(torch.ones(cfg.d_model, dtype=dtype))
        self.attn = Attention(cfg, layer, dtype, layout)
        self.moe_norm = nn.Parameter(torch.ones(cfg.d_model, dtype=dtype))
        self.moe = MoELayer(cfg.moe, cfg.d_model, dtype, cfg.reduce_chunks, layout)

    def forward(self, x: torch.Tensor, pending: Optional[torch.Tensor], step: Step,
                cache: KVCache) -> tuple[torch.Tensor, torch.Tensor, Routing]:
        """x: the residual stream; pending: the previous block's output, not yet added to it (None for the
        first block). Returns the stream, this block's output (pending for the next) and its routing:
        each add is fused with the norm that reads its sum (one kernel on batch_invariant)."""
        x, h = add_and_norm(x, pending, self.attn_norm, self.eps)
        x, h = kernels.add_rms_norm(x, self.attn(h, step, cache), self.moe_norm, self.eps)
        # only sequence_capacity carries state across steps; the others would ignore the gathered copy
        state = cache.router_state(self.layer, step.slots) if self.moe.router.stateful else None
        y, routing = self.moe(h, step.seq_idx, step.positions, state)
        if routing.state is not None:
            cache.set_router_state(self.layer, step.slots, routing.state)
        return x, y, routing


def add_and_norm(x: torch.Tensor, pending: Optional[torch.Tensor], weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + pending, its rms_norm), or (x, rms_norm(x)) when nothing is pending."""
    if pending is None:
        return x, kernels.rms_norm(x, weight, eps)
    return kernels.add_rms_norm(x, pending, weight, eps)


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None,
                 layout: Optional[Layout] = None):
        """layout: spread the model over the ranks of a process group (detmoe/moe/parallel.py); each rank then
        holds its shard of the weights the same config gives one device, and returns the full logits."""
        super().__init__()
        if layout is not None:
            layout.check(cfg)
        self.cfg, self.layout = cfg, layout
        dtype = cfg.torch_dtype
        # built in place, in the target dtype: a large preset never passes through CPU memory, nor
        # through fp32 (twice its size in bf16)
        with torch.device(device or "cpu"):
            self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model, dtype=dtype))
            self.blocks = nn.ModuleList(Block(cfg, i, dtype, layout) for i in range(cfg.n_layers))
            self.final_norm = nn.Parameter(torch.ones(cfg.d_model, dtype=dtype))
            self.lm_head = (None if cfg.tie_embeddings else
                            nn.Parameter(torch.empty(cfg.d_model, cfg.vocab_size, dtype=dtype)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, ones for norms, from a generator seeded by cfg.seed."""
        if self.embed.is_meta:  # shapes only (moe.from_pretrained fills them in): nothing to draw
            return
        # drawn on the model's device (a large preset would take minutes on the CPU): the same config
        # gives the same weights on every machine of one device type. Drawn in fp32 whatever the dtype
        # and rounded by copy_, so a model built in bf16 holds its fp32 twin's weights cast to bf16.
        g = torch.Generator(device=self.embed.device).manual_seed(self.cfg.seed)
        shards = shards_of(self)
        for name, p in self.named_parameters():
            if name.endswith("norm"):
                p.fill_(1.0)
            else:  # a sharded parameter draws the full tensor and keeps its part: the same weights
                shard = shards.get(name)
                draw = torch.randn(p.shape if shard is None else shard.full_shape(p.shape), generator=g,
                                   device=p.device, dtype=torch.float32)
                p.copy_((draw if shard is None else shard.take(draw)).mul_(self.cfg.init_std))

    # The parameters, not cfg.dtype, say where and in what dtype the model computes: `.to()`, `.half()`
    # and `.cuda()` move them, and everything a forward allocates follows them.
    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def new_cache(self, n_slots: int, max_len: Optional[int] = None) -> KVCache:
        return KVCache(self.cfg, n_slots, max_len, dtype=self.dtype, device=self.device,
                       n_kv_heads=self.cfg.n_kv_heads // size_of(self.layout))

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, cache: Optional[KVCache] = None,
                slots: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list[Routing]]:
        """tokens [T] of B sequences laid end to end (sequence b is tokens[cu_seqlens[b]:cu_seqlens[b+1]]).

        With a cache, sequence b continues the one stored in cache slot slots[b] (default b) and its
        tokens are appended there. Returns logits [T, V] (fp32) and one Routing per layer.
        """
        return self._forward(tokens, cu_seqlens, cache, slots)

    def forward_train(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, list[Routing]]:
        """The same computation as `forward` (no cache), with autograd on: for training. Run it under
        `kernels.use_backend("torch")`; the batch-invariant kernels have no backward. Layout-free models
        only: the cross-rank sums of a sharded model are not autograd operations."""
        if self.layout is not None:
            raise ValueError("forward_train needs a layout-free model (layout=None): a sharded model's "
                             "collectives have no backward")
        return self._forward(tokens, cu_seqlens, None, None)

    def _forward(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, cache: Optional[KVCache],
                 slots: Optional[torch.Tensor]) -> tuple[torch.Tensor, list[Routing]]:
        # Inputs are checked where they are given, each group of checks read back in one transfer (a
        # device sync): host tensors (the engine's) cost none for the batch; the slot checks read the
        # cache, one transfer.
        max_q = self._check_batch(tokens, cu_seqlens)
        B = cu_seqlens.shape[0] - 1
        tokens, cu_seqlens = tokens.to(self.device), cu_seqlens.to(self.device)
        q_lens = cu_seqlens[1:] - cu_seqlens[:-1]
        if cache is None:
            cache = self.new_cache(B, max_q)
            slots = torch.arange(B, device=self.device)  # a fresh cache fits the batch: nothing to check
        else:
            cache.check_fits(self.cfg, self.dtype, self.device, self.cfg.n_kv_heads // size_of(self.layout))
            if slots is not None and (not isinstance(slots, torch.Tensor) or slots.dtype not in INDEX_DTYPES):
                raise ValueError(f"slots must be an int32/int64 tensor, got {_describe(slots)}")
            slots = torch.arange(B, device=self.device) if slots is None else slots.to(self.device)
            self._check_slots(slots, B, q_lens, cache)
        return self._run(tokens, cu_seqlens, cache, slots)

    @torch.no_grad()
    def run_step(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, cache: KVCache,
                 slots: torch.Tensor) -> tuple[torch.Tensor, list[Routing]]:
        """`forward` without its input checks: every tensor already on the model's device and valid. No
        host sync for a dropless, stateless router, so a CUDA graph can capture it (detmoe/moe/graphs.py)."""
        return self._run(tokens, cu_seqlens, cache, slots)

    def _run(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, cache: KVCache,
             slots: torch.Tensor) -> tuple[torch.Tensor, list[Routing]]:
        step = Step.build(cu_seqlens, slots, cache.lengths[slots], n_tokens=tokens.shape[0])
        x = self.embed[tokens]                                                      # [T, D]
        routings, pending = [], None
        for block in self.blocks:
            x, pending, routing = block(x, pending, step, cache)
            routings.append(routing)
        cache.lengths[slots] = step.kv_lens
        _, x = add_and_norm(x, pending, self.final_norm, self.cfg.norm_eps)
        head = self.embed.t() if self.lm_head is None else self.lm_head
        return kernels.matmul_widened(x, head), routings                          # [T, V] fp32

    def _check_batch(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> int:
        """Validate a ragged batch; returns its longest sequence's length."""
        for name, t in (("tokens", tokens), ("cu_seqlens", cu_seqlens)):
            if not isinstance(t, torch.Tensor) or t.dtype not in INDEX_DTYPES:
                raise ValueError(f"{name} must be an int32/int64 tensor, got {_describe(t)}")
        if tokens.dim() != 1 or tokens.numel() == 0:
            raise ValueError(f"tokens must be a non-empty 1-D tensor, got shape {tuple(tokens.shape)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got {tuple(cu_seqlens.shape)}")
        lens = cu_seqlens[1:] - cu_seqlens[:-1]
        lo, hi, first, last, shortest, longest = _to_host(tokens.min(), tokens.max(), cu_seqlens[0],
                                                          cu_seqlens[-1], lens.min(), lens.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"tokens must be in 0..vocab_size-1={self.cfg.vocab_size - 1}, "
                             f"got range {lo}..{hi}")
        if first != 0 or last != tokens.numel() or shortest < 1:
            raise ValueError("cu_seqlens must start at 0, end at len(tokens) and grow strictly "
                             f"(every sequence has >= 1 token), got {cu_seqlens.tolist()}")
        if longest > self.cfg.max_seq_len:
            raise ValueError(f"a sequence of {longest} tokens is longer than the model's max_seq_len="
                             f"{self.cfg.max_seq_len}")
        return longest

    def _check_slots(self, slots: torch.Tensor, B: int, q_lens: torch.Tensor, cache: KVCache) -> None:
        if slots.shape != (B,):
            raise ValueError(f"slots must have one entry per sequence ({B}), got {tuple(slots.shape)}")
        ordered = slots.sort().values
        repeated = (ordered[1:] == ordered[:-1]).any()
        # clamped, so that a bad slot cannot index out of range before the range check reports it
        safe = slots.clamp(0, cache.n_slots - 1)
        too_long = (cache.lengths[safe] + q_lens > cache.max_len).any()
        lo, hi, rep, over = _to_host(ordered[0], ordered[-1], repeated, too_long)
        if lo < 0 or hi >= cache.n_slots or rep:
            raise ValueError(f"slots must be distinct cache slots in 0..{cache.n_slots - 1}, got {slots.tolist()}")
        if over:
            raise ValueError(f"a sequence would exceed the cache's max_len={cache.max_len}")


INDEX_DTYPES = (torch.int32, torch.int64)


def _describe(value) -> str:
    return f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else f"{type(value).__name__} {value!r}"


def _to_host(*scalars: torch.Tensor) -> list[int]:
    """Integer (or bool) 0-d tensors as Python ints: one transfer per device they live on, none for
    host tensors (a device sync each, so checks are batched through here)."""
    out: list[int] = [0] * len(scalars)
    by_device: dict[torch.device, list[int]] = {}
    for i, s in enumerate(scalars):
        by_device.setdefault(s.device, []).append(i)
    for idx in by_device.values():
        for i, v in zip(idx, torch.stack([scalars[i].long() for i in idx]).tolist()):
            out[i] = v
    return out


def cu_seqlens_of(seqs: list[list[int]] | list[torch.Tensor], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack sequences of token ids into (tokens [T], cu_seqlens [B+1])."""
    if not isinstance(seqs, (list, tuple)) or not seqs:
        raise ValueError(f"seqs must be a non-empty list of non-empty 1-D token sequences, got {seqs!r}")
    parts = []
    for i, s in enumerate(seqs):
        p = torch.as_tensor(s) if not (isinstance(s, (list, tuple)) and any(isinstance(t, bool) for t in s)) \
            else torch.tensor([0.5])   # bools are not token ids (as_tensor reads True as 1)
        # int ids only: as_tensor(..., dtype=long) would truncate 1.5 to 1 and read True as 1
        if p.dim() != 1 or p.numel() == 0 or p.dtype not in (torch.int8, torch.uint8, torch.int16, *INDEX_DTYPES):
            raise ValueError(f"seqs[{i}] must be a non-empty 1-D sequence of int token ids, got {s!r}")
        parts.append(p.long())
    lens = torch.tensor([0] + [p.numel() for p in parts])
    return torch.cat(parts).to(device), torch.cumsum(lens, 0).to(device)
