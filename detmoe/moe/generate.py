"""Batched generation with the KV cache: one ragged prefill of all prompts, then decode steps.

Greedy at temperature 0 (ties go to the lowest token id); otherwise temperature / top-p sampling where
prompt i draws from its own generator seeded with seed + i, so a sample does not depend on how many
other prompts are drawn beside it.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import torch

from detmoe.moe.graphs import DecodeGraphs, graphs_by_default
from detmoe.moe.model import MoETransformer, cu_seqlens_of
from detmoe.moe.parallel import broadcast_seed


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_sampling(temperature: float, top_p: float) -> None:
    """The sampling options' rules, shared by `generate` and the serving engine's `Request`."""
    if not (isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
            and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if not (isinstance(top_p, numbers.Real) and not isinstance(top_p, bool) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")


def check_count(name: str, value: Any, lo: int) -> None:
    if not _is_int(value) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


# torch.Generator.manual_seed takes seeds in [-2**63, 2**64); generate draws prompt i from seed + i
SEED_RANGE = (0, 2**63 - 1)


def check_seed(name: str, seed: Any, n_streams: int = 1) -> None:
    """None, or an int (Python or numpy) with seed + n_streams - 1 within SEED_RANGE."""
    if seed is None:
        return
    lo, hi = SEED_RANGE
    if not _is_int(seed) or not lo <= seed <= hi - (n_streams - 1):
        raise ValueError(f"{name} must be None or an int in {lo}..{hi - (n_streams - 1)} (seed + i draws "
                         f"prompt i), got {seed!r}")


def check_prompt(name: str, prompt: Sequence[int] | torch.Tensor, vocab_size: Optional[int] = None) -> None:
    """A prompt is a non-empty sequence of int token ids, each in 0..vocab_size-1 where the model is known."""
    ids = prompt if isinstance(prompt, torch.Tensor) else None
    if ids is None and isinstance(prompt, (list, tuple)) and all(_is_int(t) for t in prompt):
        ids = torch.tensor(prompt, dtype=torch.long)
    if ids is None or ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be a non-empty list of int token ids, got {prompt!r}")
    if vocab_size is not None:
        lo, hi = torch.stack([ids.min(), ids.max()]).tolist()   # one transfer
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} must hold token ids in 0..vocab_size-1={vocab_size - 1}, got {lo}..{hi}")


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generators: Optional[list[torch.Generator]] = None) -> torch.Tensor:
    """Next token per row of logits [B, V]. Row b uses generators[b] when sampling."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    # the largest logit subtracted first and divided in fp64: a tiny temperature sends the others to -inf
    # (probability 0), never inf - inf (NaN), and no positive temperature rounds to a zero divisor
    scaled = logits.double() - logits.double().max(dim=-1, keepdim=True).values
    probs = torch.softmax(scaled / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = torch.cumsum(sorted_p, dim=-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    rows = [torch.multinomial(probs[b].cpu(), 1, generator=generators[b]) for b in range(probs.shape[0])]
    return torch.cat(rows).to(logits.device)


def generate(model: MoETransformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: Optional[int] = None, eos_id: Optional[int] = None,
             graphs: Optional[bool] = None) -> list[list[int]]:
    """Generate up to max_new_tokens for each prompt (a list of token ids); returns the new tokens.
    graphs: decode steps as CUDA graphs (detmoe/moe/graphs.py), default on where the step can be captured."""
    vocab = model.cfg.vocab_size
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of token-id lists, got {prompts!r}")
    for i, p in enumerate(prompts):
        check_prompt(f"prompts[{i}]", p, vocab)
    check_count("max_new_tokens", max_new_tokens, 0)
    check_sampling(temperature, top_p)
    check_seed("seed", seed, len(prompts))
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} exceeds the "
                         f"model's max_seq_len={model.cfg.max_seq_len}")
    if eos_id is not None and not (_is_int(eos_id) and 0 <= eos_id < vocab):
        raise ValueError(f"eos_id must be None or a token id in 0..vocab_size-1={vocab - 1}, got {eos_id!r}")
    if temperature > 0 and seed is None:
        seed = int(torch.seed() % 2**31)
        if model.layout is not None:  # every rank must draw the same samples: rank 0's seed for all
            seed = broadcast_seed(seed, model.layout)
    generators = None if temperature == 0 else [torch.Generator().manual_seed(int(seed) + i)
                                                for i in range(len(prompts))]
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return out
    if graphs is None:
        graphs = graphs_by_default(model)
    # with graphs, one slot more than prompts: the padding's (the last)
    cache = model.new_cache(len(prompts) + bool(graphs), max(len(p) for p in prompts) + max_new_tokens)
    decode = DecodeGraphs(model, cache) if graphs else None
    tokens, cu = cu_seqlens_of(prompts, model.device)
    logits, _ = model(tokens, cu, cache)
    last = logits[cu[1:] - 1]                                                  # [B, V]
    active = list(range(len(prompts)))
    for step in range(max_new_tokens):
        gens = None if generators is None else [generators[i] for i in active]
        nxt = sample_next(last, temperature, top_p, gens).tolist()
        still = []
        for i, t in zip(active, nxt):
            out[i].append(t)
            if t != eos_id and step + 1 < max_new_tokens:
                still.append(i)
        active = still
        if not active:
            break
        if decode is not None:
            last = decode.step(torch.tensor([out[i][-1] for i in active]), torch.tensor(active))
            continue
        tokens = torch.tensor([out[i][-1] for i in active], device=model.device)
        cu = torch.arange(len(active) + 1, device=model.device)
        last, _ = model(tokens, cu, cache, slots=torch.tensor(active, device=model.device))
    return out
