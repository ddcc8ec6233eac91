"""Batch compositions a probe prompt is run in: batch sizes, its place in the batch, co-requests of
other lengths and contents, and how its prefill meets their decode.

Modes:
- `prefill`: every request arrives together; the probe's prompt is prefilled beside the others'.
- `mixed`: co-requests arrive first; the probe's prefill runs in a step with their decode tokens.
- `chunked`: like mixed, and the probe's prompt is prefilled in chunks across several steps.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

from detmoe.moe.engine import Request

MODES = ("prefill", "mixed", "chunked")


@dataclass
class Composition:
    batch_size: int
    probe_index: int                 # place of the probe in the batch
    mode: str
    co_prompts: list[list[int]]
    co_new_tokens: list[int]
    chunk: int | None = None         # chunked: 2-4 tokens per step for every 32 tokens of the probe

    def requests(self, probe: list[int], max_new_tokens: int) -> tuple[Request, list[Request]]:
        """The probe's request (tracked) and every request of the batch."""
        late = self.mode != "prefill"
        # a chunk grows with the probe, so a long prompt takes 8-16 steps, not hundreds (as servers
        # chunk a long prefill by hundreds of tokens); a probe of up to 32 tokens takes `chunk` itself
        chunk = None if self.chunk is None else self.chunk * -(-len(probe) // 32)
        probe_req = Request(probe, max_new_tokens, arrival=int(late), order=self.probe_index,
                            chunk=chunk, track=True)
        others = [Request(p, n, arrival=0, order=i if i < self.probe_index else i + 1)
                  for i, (p, n) in enumerate(zip(self.co_prompts, self.co_new_tokens))]
        return probe_req, [probe_req] + others


def random_prompt(rng: random.Random, vocab: int, length: int, text: Optional[bytes] = None) -> list[int]:
    """Random token ids, or (for a byte-level model) a window of real text at a random offset."""
    if text is None:
        return [rng.randrange(vocab) for _ in range(length)]
    start = rng.randrange(len(text) - length)
    return list(text[start:start + length])


def make_compositions(batch_sizes: list[int], per_size: int, vocab: int, max_len: int,
                      max_new_tokens: int, seed: int, text: Optional[bytes] = None) -> list[Composition]:
    """`per_size` random compositions for each batch size, cycling through the modes."""
    rng = random.Random(seed)
    out = []
    for B in batch_sizes:
        for i in range(per_size):
            mode = "prefill" if B == 1 else MODES[(len(out) + i) % len(MODES)]
            co = [random_prompt(rng, vocab, rng.randint(1, max_len), text) for _ in range(B - 1)]
            out.append(Composition(
                batch_size=B, probe_index=rng.randrange(B), mode=mode, co_prompts=co,
                # co-requests generate more tokens than the probe, so it has company while it decodes
                # (a chunked probe prefill takes extra steps, at whose end some may have left)
                co_new_tokens=[rng.randint(max_new_tokens + 1, 2 * max_new_tokens + 1) for _ in co],
                chunk=rng.randint(2, 4) if mode == "chunked" else None))
    return out


def slot_positions(batch_sizes: list[int], probe_max_len: int, co_max_len: int, max_new_tokens: int) -> int:
    """The most KV-cache positions a slot of the ablation's engine (experiments/ablate.run_cell) can need:
    the longest prompt, the most new tokens (a co-request's: up to 2 x max_new_tokens + 1, above) and one."""
    company = any(B > 1 for B in batch_sizes)
    longest = max(probe_max_len, co_max_len) if company else probe_max_len
    return longest + (2 * max_new_tokens + 1 if company else max_new_tokens) + 1


def make_probes(n: int, vocab: int, min_len: int, max_len: int, seed: int,
                text: Optional[bytes] = None) -> list[list[int]]:
    rng = random.Random(seed + 1)
    return [random_prompt(rng, vocab, rng.randint(min_len, max_len), text) for _ in range(n)]
