"""Shared helpers for the invariant-mode tests: bitwise comparison, random row subsets, and padded attention
batches with masks built the way transformers' sdpa path builds them. Random data comes from torch's global
generator, which the `seed` fixture (tests/conftest.py) seeds fresh each run."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns as integers of its width (-0.0 and 0.0, two NaN payloads told apart)."""
    return t.view(_INT[t.element_size()]) if t.is_floating_point() else t


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """got and want have the same dtype, shape and bits; else say where they differ."""
    __tracebackhide__ = True
    assert got.dtype == want.dtype and got.shape == want.shape, (
        f"{what}: {got.dtype} {tuple(got.shape)} against {want.dtype} {tuple(want.shape)}")
    differs = bits(got) != bits(want)
    if differs.any():
        first = tuple(differs.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(differs.sum())} of {differs.numel()} elements differ; first at "
                             f"{first}: {got[first].item()!r} against {want[first].item()!r}")


def random_subsets(n: int) -> list[torch.Tensor]:
    """Index sets into n rows: one random row alone, two of random sizes 1..n, all n shuffled; each in a
    random order (so a row moves to other positions in batches of other sizes)."""
    sizes = [1, int(torch.randint(1, n + 1, ())), int(torch.randint(1, n + 1, ())), n]
    return [torch.randperm(n)[:m] for m in sizes]


def assert_rows_invariant(fn: Callable[..., torch.Tensor], args: Sequence[torch.Tensor],
                          dims: Sequence[Optional[int]], out_dim: int = 0) -> torch.Tensor:
    """fn(*args) on every random subset of the rows (args[i] cut along dims[i]; None: passed whole) gives each
    row the bits it has in fn(*args). Returns fn(*args)."""
    __tracebackhide__ = True
    full = fn(*args)
    n = full.shape[out_dim]
    for idx in random_subsets(n):
        part = fn(*[a if d is None else a.index_select(d, idx) for a, d in zip(args, dims)])
        assert_same_bits(part, full.index_select(out_dim, idx),
                         f"rows {idx.tolist()[:8]}{'...' if len(idx) > 8 else ''} ({len(idx)} of {n}) computed "
                         f"alone against in the full batch")
    return full


# --- padded attention batches ----------------------------------------------------------------------------

def real_positions(length: int, S: int, side: str) -> torch.Tensor:
    """The padded positions of a request of `length` tokens in a row of S."""
    start = S - length if side == "left" else 0
    return torch.arange(start, start + length)


def pad_batch(rows: Sequence[torch.Tensor], side: str, S: Optional[int] = None) -> torch.Tensor:
    """rows [H, L_b, D] -> [B, H, S, D], padded on `side` with large random garbage (it must never count)."""
    S = max(r.shape[1] for r in rows) if S is None else S
    H, D = rows[0].shape[0], rows[0].shape[2]
    out = torch.randn(len(rows), H, S, D).to(rows[0].dtype) * 100
    for b, r in enumerate(rows):
        out[b, :, real_positions(r.shape[1], S, side)] = r
    return out


def padding_mask(lengths: Sequence[int], Sq: int, Sk: int, side: str) -> torch.Tensor:
    """transformers' sdpa mask, bool [B, 1, Sq, Sk]: query i may see key j where j is a real key and j <= i
    (queries at the last Sq of the Sk positions). A left-padding query sees nothing; a right-padding query
    sees what its row's last real query sees."""
    key = torch.arange(Sk)
    query = torch.arange(Sk - Sq, Sk)
    masks = []
    for L in lengths:
        real = torch.zeros(Sk, dtype=torch.bool)
        real[real_positions(L, Sk, side)] = True
        masks.append((key[None, :] <= query[:, None]) & real[None, :])
    return torch.stack(masks)[:, None]


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as transformers' additive float mask: 0 where a key counts, dtype's min where not."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
