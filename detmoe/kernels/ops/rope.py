"""Rotary embedding of the step's queries and keys, with the keys and values stored in the KV cache, in
one kernel.

The stock form (`rope_and_store_torch`, the torch backend's) concatenates q and k, casts them to fp32,
rotates with six elementwise ops, concatenates the halves, casts back and writes k and v with two
index_put: about fourteen launches per layer, each moving a few kilobytes in a decode step, where a
CUDA-graph step is bound by its kernel count. This kernel does the same arithmetic per element:

    x1, x2 = fp32(x[:half]), fp32(x[half:])
    out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]     each product rounded to fp32, then the add
    out rounded to x's dtype (nearest even)

The launch disables fp fusion, so the compiler cannot contract a product and its add into an fma (one
rounding instead of two): the bits are the stock form's. Each element depends only on its token's
values and position, so the result is batch-invariant whatever the launch's tiles.
"""
from __future__ import annotations

import torch

from detmoe.kernels import runtime
from detmoe.kernels.checks import check_index_range
from detmoe.kernels.ops.rounding import round_by_bits, rounded_to
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _rotated(x_ptr, tokens, heads, d, cos, sin, ok, stride_t, stride_h, HALF: tl.constexpr):
    """The two rotated halves [ROWS, HEADS, HALF] (fp32) of heads `heads` of tokens `tokens`."""
    base = x_ptr + tokens[:, None, None] * stride_t + heads[None, :, None] * stride_h + d[None, None, :]
    x1 = tl.load(base, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=ok, other=0.0).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit(do_not_specialize=["T"])
def _rope_and_store_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, pos_ptr, T,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_ot, stride_oh,
    stride_cs, stride_cl, stride_ch,
    H: tl.constexpr, HKV: tl.constexpr, H_POW2: tl.constexpr, HKV_POW2: tl.constexpr, HALF: tl.constexpr,
    ROWS: tl.constexpr, BY_BITS: tl.constexpr,
):
    tokens = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    t_ok = tokens < T
    d = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + tokens[:, None] * stride_ct + d[None, :], mask=t_ok[:, None], other=0.0)[:, None, :]
    sin = tl.load(sin_ptr + tokens[:, None] * stride_ct + d[None, :], mask=t_ok[:, None], other=0.0)[:, None, :]

    # -- queries: rotated into a new tensor --
    hq = tl.arange(0, H_POW2)
    ok = t_ok[:, None, None] & (hq < H)[None, :, None]
    a, b = _rotated(q_ptr, tokens, hq, d, cos, sin, ok, stride_qt, stride_qh, HALF)
    out = q_out_ptr + tokens[:, None, None] * stride_ot + hq[None, :, None] * stride_oh + d[None, None, :]
    tl.store(out, rounded_to(a, q_out_ptr.dtype.element_ty, BY_BITS), mask=ok)
    tl.store(out + HALF, rounded_to(b, q_out_ptr.dtype.element_ty, BY_BITS), mask=ok)

    # -- keys (rotated) and values (as they are): each token's cache slot and position --
    slot = tl.load(slots_ptr + tokens, mask=t_ok, other=0).to(tl.int64)
    pos = tl.load(pos_ptr + tokens, mask=t_ok, other=0).to(tl.int64)
    hk = tl.arange(0, HKV_POW2)
    ok = t_ok[:, None, None] & (hk < HKV)[None, :, None]
    cell = (slot * stride_cs + pos * stride_cl)[:, None, None] + hk[None, :, None] * stride_ch + d[None, None, :]
    a, b = _rotated(k_ptr, tokens, hk, d, cos, sin, ok, stride_kt, stride_kh, HALF)
    tl.store(k_cache_ptr + cell, rounded_to(a, k_cache_ptr.dtype.element_ty, BY_BITS), mask=ok)
    tl.store(k_cache_ptr + cell + HALF, rounded_to(b, k_cache_ptr.dtype.element_ty, BY_BITS), mask=ok)
    v_src = v_ptr + tokens[:, None, None] * stride_vt + hk[None, :, None] * stride_vh + d[None, None, :]
    tl.store(v_cache_ptr + cell, tl.load(v_src, mask=ok), mask=ok)
    tl.store(v_cache_ptr + cell + HALF, tl.load(v_src + HALF, mask=ok), mask=ok)


def rope_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, token_slots: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
    """q [T, H, Dh], k and v [T, Hkv, Dh] (fp16/bf16/fp32, one dtype), cos and sin [T, 1, Dh/2] or
    [T, Dh/2] fp32 (moe.attention.rope_tables); k_cache, v_cache [slots, L, Hkv, Dh] in that dtype;
    token_slots, positions [T] int. Stores rotated k and v at (token_slots[t], positions[t]) and returns
    rotated q [T, H, Dh]: `rope_and_store_torch`'s result, bit for bit."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        runtime.check_float(name, t)
        runtime.check_device(name, t)
    T, H, Dh = q.shape
    Hkv = k.shape[1]
    if k.shape != (T, Hkv, Dh) or v.shape != k.shape or Dh % 2:
        raise ValueError(f"q must be [T, H, Dh] with Dh even and k, v [T, Hkv, Dh]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k, v and the caches must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    if k_cache.dim() != 4 or k_cache.shape[2:] != (Hkv, Dh) or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must be [slots, L, Hkv={Hkv}, Dh={Dh}], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    half = Dh // 2
    cos, sin = cos.reshape(T, half), sin.reshape(T, half)
    if cos.dtype != torch.float32 or sin.dtype != torch.float32 or cos.stride() != sin.stride():
        raise ValueError("cos and sin must be fp32 [T, Dh/2] tables of one layout (moe.attention.rope_tables)")
    if token_slots.shape != (T,) or positions.shape != (T,):
        raise ValueError(f"token_slots and positions must be [T={T}], got {tuple(token_slots.shape)} and "
                         f"{tuple(positions.shape)}")
    check_index_range("token_slots", token_slots, k_cache.shape[0], " (cache slots)")
    check_index_range("positions", positions, k_cache.shape[1], " (cache positions)")
    token_slots, positions = token_slots.contiguous(), positions.contiguous()   # read at index t
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("k_cache and v_cache must share one layout with a contiguous last dim")
    if half & (half - 1):
        raise ValueError(f"head_dim/2 must be a power of two for the fused kernel, got {half}")
    q_out = runtime.empty((T, H, Dh), q.device, q.dtype)
    if T == 0:
        return q_out
    # interpreted: few programs of many tokens; on the GPU one token per program (a decode step's few
    # tokens still spread over the SMs). Never chosen by T, which would compile a variant per size class.
    rows = runtime.pow2_at_most(2048 // (H * half), 64) if runtime.interpreting() else 1
    _rope_and_store_kernel[(runtime.cdiv(T, rows),)](
        q, k, v, cos, sin, q_out, k_cache, v_cache, token_slots, positions, T,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        q_out.stride(0), q_out.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        H=H, HKV=Hkv, H_POW2=runtime.next_pow2(H), HKV_POW2=runtime.next_pow2(Hkv), HALF=half, ROWS=rows,
        BY_BITS=round_by_bits(q.dtype), num_warps=4,
        # no fma: each product is rounded to fp32 before its add, as the stock form
        enable_fp_fusion=False)
    return q_out
