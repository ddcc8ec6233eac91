"""The model steps that bench_model times and profile_step profiles: a cell's shape, the model, its
inputs, and the decode step that starts every call at the same cached length."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from detmoe.moe import KVCache, ModelConfig, MoETransformer


@dataclass(frozen=True)
class Shape:
    preset: str
    mode: str       # "decode" or "prefill"
    batch: int      # sequences
    seq_len: int    # new tokens per sequence (1 at decode)
    context: int    # cached tokens per sequence before the step (0 at prefill)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def label(self) -> str:
        if self.mode == "decode":
            return f"{self.preset} decode B={self.batch} ctx={self.context}"
        return f"{self.preset} prefill {self.batch}x{self.seq_len}"


def shape_of(row: dict) -> Shape:
    """The Shape of a result row (or of any dict carrying Shape's fields)."""
    return Shape(*(row[f.name] for f in dataclasses.fields(Shape)))


def build_model(preset: str, max_len: int, device: str | torch.device) -> MoETransformer:
    return MoETransformer(ModelConfig.from_name(preset, max_seq_len=max_len), device=device)


def decode_inputs(model: MoETransformer, B: int,
                  context: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, KVCache]:
    """tokens [B], cu_seqlens [B+1], slots [B] and a cache of B+1 slots of context+1 positions (the last
    slot is DecodeGraphs' padding slot, never a real sequence's)."""
    dev = model.device
    g = torch.Generator().manual_seed(B)
    tokens = torch.randint(0, model.cfg.vocab_size, (B,), generator=g).to(dev)
    return tokens, torch.arange(B + 1, device=dev), torch.arange(B, device=dev), model.new_cache(B + 1, context + 1)


def prefill_inputs(model: MoETransformer, B: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B*L] of B sequences of L tokens, cu_seqlens [B+1]."""
    g = torch.Generator().manual_seed(B * L)
    tokens = torch.randint(0, model.cfg.vocab_size, (B * L,), generator=g).to(model.device)
    return tokens, torch.arange(B + 1, device=model.device) * L


def decode_step(run: Callable[[], object], cache: KVCache, context: int) -> Callable[[], object]:
    """The timed decode step: every sequence back at `context` cached tokens, then one token each."""
    def step():
        cache.lengths.fill_(context)
        return run()
    return step
