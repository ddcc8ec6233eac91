"""What a router decided, per token: the record every experiment reads.

Legend: T = tokens in the batch, S = expert slots per token (top_k for token-choice routers,
n_experts for expert choice), E = experts, B = sequences.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class ChunkState:
    """Per-sequence router state carried across steps (sequence_capacity only).

    `counts[b, e]` is how many assignments sequence b has sent to expert e inside chunk `chunk[b]`
    (the chunk holding its last processed token); chunk -1 means nothing processed yet.
    """
    counts: torch.Tensor  # [B, E] int64
    chunk: torch.Tensor   # [B] int64


@dataclass
class Routing:
    experts: torch.Tensor  # [T, S] int64, each token's experts, best first
    weights: torch.Tensor  # [T, S] fp32 combine weights (already zero where dropped)
    dropped: torch.Tensor  # [T, S] bool, assignment lost to a capacity limit
    probs: torch.Tensor    # [T, E] fp32 router probabilities, for margins and audits
    state: Optional[ChunkState] = None  # next step's state (sequence_capacity only)

    @property
    def kept(self) -> torch.Tensor:
        return ~self.dropped

    def expert_sets(self) -> torch.Tensor:
        """[T, E] bool: which experts actually process each token (kept assignments only)."""
        out = torch.zeros_like(self.probs, dtype=torch.bool)
        out.scatter_(1, self.experts, self.kept)
        return out

    def margins(self, k: int) -> torch.Tensor:
        """[T] fp32 gap between a token's k-th and (k+1)-th router probability: how close the router
        came to choosing another expert set. Infinite when every expert is chosen."""
        if k >= self.probs.shape[1]:
            return torch.full((self.probs.shape[0],), float("inf"), device=self.probs.device)
        top = torch.topk(self.probs, k + 1, dim=1).values
        return top[:, k - 1] - top[:, k]
