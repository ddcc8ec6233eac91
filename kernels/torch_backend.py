"""The stock path: PyTorch and vendor kernels (cuBLAS, SDPA/flash, MKL/oneDNN on the CPU).

This is what an ordinary serving stack runs, batch-variance included; the ablation measures it against
the `batch_invariant` backend. Each op is written the way production code writes it (one batched call),
not rewritten to be invariant.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.checks import check_attention_indices, check_group_offsets


class TorchBackend:
    name = "torch"
    ordered_collectives = False

    def matmul(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.mm(x, w)

    def grouped_matmul(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if not offsets.is_cuda:  # the values only on the host: on a GPU reading them is a sync per call
            check_group_offsets(offsets, w.shape[0], x.shape[0])
        # torch._grouped_mm wants 16-byte aligned strides; fall back to a loop of mm where it can't run
        # (e.g. bf16 on the CPU, or odd sizes).
        try:
            return torch._grouped_mm(x, w, offs=offsets.to(torch.int32))
        except (RuntimeError, NotImplementedError):
            out = x.new_empty(x.shape[0], w.shape[2])
            start = 0
            for e, end in enumerate(offsets.tolist()):
                if end > start:
                    out[start:end] = torch.mm(x[start:end], w[e])
                start = end
            return out

    # Partials for completeness (a stock layer all-reduces its rounded local product instead): each chunk
    # as the stock GEMM computes it, in fp32.
    def matmul_partials(self, x: torch.Tensor, w: torch.Tensor, chunks: int) -> torch.Tensor:
        return torch.stack([torch.mm(xc, wc).float() for xc, wc in zip(x.chunk(chunks, 1), w.chunk(chunks, 0))])

    def grouped_matmul_partials(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                                chunks: int) -> torch.Tensor:
        return torch.stack([self.grouped_matmul(xc.contiguous(), wc.contiguous(), offsets).float()
                            for xc, wc in zip(x.chunk(chunks, 1), w.chunk(chunks, 1))])

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x.float(), dim=-1)

    def log_softmax(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(x.float(), dim=-1)

    def attention(self, q, k_cache, v_cache, cu_seqlens_q, kv_lens, slots, scale):
        # One batched SDPA call over the padded batch, as a serving stack does; the mask keeps padding
        # out of every real row. Padded query rows sit past their sequence's end, so they see all of its
        # keys (never an empty row, so no NaN) and are discarded.
        H = q.shape[1]
        q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
        # the padded sizes are read back anyway (one sync), and the index checks come in the same transfer
        max_q, max_k = check_attention_indices(cu_seqlens_q, kv_lens, slots, q.shape[0], k_cache.shape[0],
                                               k_cache.shape[1])
        # gather the batch into [B, max_q, H, Dh]
        row = torch.arange(max_q, device=q.device)
        valid_q = row[None, :] < q_lens[:, None]                              # [B, max_q]
        src = (cu_seqlens_q[:-1, None] + row[None, :]).clamp(max=q.shape[0] - 1)
        qb = q[src] * valid_q[..., None, None]                                 # [B, max_q, H, Dh]
        kb = k_cache[slots, :max_k]                                            # [B, max_k, Hkv, Dh]
        vb = v_cache[slots, :max_k]
        q_pos = (kv_lens - q_lens)[:, None] + row[None, :]                     # [B, max_q]
        k_pos = torch.arange(max_k, device=q.device)
        mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < kv_lens[:, None, None])
        out = F.scaled_dot_product_attention(
            qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2),
            attn_mask=mask[:, None], scale=scale, enable_gqa=H != k_cache.shape[2])
        out = out.transpose(1, 2)                                              # [B, max_q, H, Dh]
        return out[valid_q]
