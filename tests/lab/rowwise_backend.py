"""A slow backend for tests whose invariance needs no proof: every matmul and expert GEMM is computed
one row at a time and attention one sequence at a time, so no kernel ever sees the batch.
With `perturb_expert`, the router's probability of that expert is nudged up by one ulp: the injected
drift of a near-tie test."""
from __future__ import annotations

import torch

from detmoe.kernels.torch_backend import TorchBackend


class RowwiseBackend(TorchBackend):
    name = "rowwise"
    perturb_expert: int | None = None

    def matmul(self, x, w):
        return torch.cat([x[i:i + 1] @ w for i in range(x.shape[0])])

    def grouped_matmul(self, x, w, offsets):
        expert = torch.bucketize(torch.arange(x.shape[0]), offsets.long(), right=True)
        # rows past the last group end belong to no group (the contract leaves them unspecified: zeros)
        return torch.cat([x[i:i + 1] @ w[expert[i]] if expert[i] < w.shape[0] else x.new_zeros(1, w.shape[2])
                          for i in range(x.shape[0])])

    def softmax(self, x):
        probs = torch.stack([torch.softmax(x[i].float(), -1) for i in range(x.shape[0])])
        if self.perturb_expert is not None:
            col = probs[:, self.perturb_expert]
            probs[:, self.perturb_expert] = torch.nextafter(col, torch.ones_like(col))
        return probs

    def attention(self, q, k_cache, v_cache, cu_seqlens_q, kv_lens, slots, scale):
        parts = []
        for b in range(kv_lens.shape[0]):
            s, e = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
            parts.append(super().attention(q[s:e], k_cache, v_cache, cu_seqlens_q[b:b + 2] - s,
                                           kv_lens[b:b + 1], slots[b:b + 1], scale))
        return torch.cat(parts)


class PerturbedRowwiseBackend(RowwiseBackend):
    name = "rowwise_perturbed"
    perturb_expert = 1
