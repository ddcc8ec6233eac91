"""fingerprint_rows on a CUDA GPU: each program sums the wrapped products of BLOCK_R rows in one pass over
their words (detmoe/diagnose/fingerprint.py has the definition; imported only for CUDA tensors)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fingerprint_kernel(words_ptr, weights_ptr, out_ptr, R, W, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    acc = tl.zeros((BLOCK_R,), dtype=tl.int64)
    for w0 in range(0, W, BLOCK_W):
        cols = w0 + tl.arange(0, BLOCK_W)
        ok = row_ok[:, None] & (cols[None, :] < W)
        words = tl.load(words_ptr + rows[:, None].to(tl.int64) * W + cols[None, :], mask=ok, other=0)
        weights = tl.load(weights_ptr + cols, mask=cols < W, other=0)
        # exact in 64 bits, then wrapped to 32 (a truncation keeps the low bits), then summed exactly
        product = (words.to(tl.int64) * weights[None, :].to(tl.int64)).to(tl.int32)
        acc += tl.sum(product.to(tl.int64), axis=1)
    tl.store(out_ptr + rows, acc, mask=row_ok)


def fingerprint_words(words: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """words [R, W] int32 (contiguous), weights [W] int32 -> [R] int64."""
    R, W = words.shape
    out = torch.empty(R, dtype=torch.int64, device=words.device)
    BLOCK_R, BLOCK_W = 4, 1024
    _fingerprint_kernel[(triton.cdiv(R, BLOCK_R),)](words, weights, out, R, W, BLOCK_R=BLOCK_R, BLOCK_W=BLOCK_W)
    return out
