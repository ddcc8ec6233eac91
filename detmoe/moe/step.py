"""The bookkeeping of one forward step over a ragged batch: which tokens belong to which sequence,
their positions, and the cache slots they read and write. Computed once per step, shared by layers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional

import torch


@dataclass
class Step:
    cu_seqlens: torch.Tensor  # [B+1] token offsets of the sequences in this step
    seq_idx: torch.Tensor     # [T] which sequence (0..B-1) each token belongs to
    positions: torch.Tensor   # [T] absolute position of each token in its sequence
    slots: torch.Tensor       # [B] cache slot of each sequence
    kv_lens: torch.Tensor     # [B] sequence lengths after this step
    # values derived from the step that every layer needs (e.g. RoPE tables): computed by the first
    # layer that asks, then shared, which saves a dozen small ops per layer
    _derived: dict[Hashable, Any] = field(default_factory=dict, repr=False, compare=False)

    def cached(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """compute() once per step under `key` (name it with everything compute depends on besides the
        step), then the same value for every later call."""
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    @classmethod
    def build(cls, cu_seqlens: torch.Tensor, slots: torch.Tensor, start: torch.Tensor,
              n_tokens: Optional[int] = None) -> "Step":
        """n_tokens (the step's token count, known on the host) spares repeat_interleave a device sync."""
        q_lens = cu_seqlens[1:] - cu_seqlens[:-1]
        B = q_lens.shape[0]
        seq_idx = torch.repeat_interleave(torch.arange(B, device=cu_seqlens.device), q_lens,
                                          output_size=n_tokens)
        offset = torch.arange(seq_idx.shape[0], device=cu_seqlens.device) - cu_seqlens[seq_idx]
        return cls(cu_seqlens, seq_idx, start[seq_idx] + offset, slots, start + q_lens)
