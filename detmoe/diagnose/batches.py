"""A padded batch of token-id rows, as a user's `transformers` code builds one: rows padded to the longest
on the left (generate's default) or the right, an attention mask of 1 for real tokens, and the position
ids `generate` passes (each token's count of real tokens before it)."""
from __future__ import annotations

from typing import Sequence

import torch


def pad_rows(rows: Sequence[Sequence[int] | torch.Tensor], side: str, pad_id: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """rows of token ids -> (ids [B, longest] long, attention mask [B, longest] long), padded on `side`,
    on the first row's device when the rows are tensors."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    rows = [r if isinstance(r, torch.Tensor) else torch.tensor(list(r), dtype=torch.long) for r in rows]
    if not rows or any(r.dim() != 1 or r.numel() == 0 for r in rows):
        raise ValueError("rows must be a non-empty list of non-empty 1-D token-id sequences")
    longest, device = max(r.numel() for r in rows), rows[0].device
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), longest), dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        span = slice(longest - r.numel(), longest) if side == "left" else slice(0, r.numel())
        ids[b, span], mask[b, span] = r.to(device=device, dtype=torch.long), 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position counted over the real tokens before it (padding at 0), as generate does."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
