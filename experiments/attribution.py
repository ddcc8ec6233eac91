"""Attribute every divergence between a reference run and a test run of the same request.

A token *diverges* when its logits differ bitwise from the reference. Its cause:
- `arithmetic`: every layer routed this token and all earlier tokens of the request exactly as in the
  reference; only the reduction order of some kernel differed.
- `structural`: routing differed, and at the first layer where it did, some token kept its own top-k
  preference but lost or gained an expert: another request took the slot (capacity, expert choice).
- `amplified`: routing differed, and at the first such layer the token's own top-k choice flipped:
  slightly different numbers crossed a near tie. The reference top-k margin of each flip is recorded.

Only positions whose inputs agree are compared: the prompt, then generated tokens up to and including
the first one that differs (its logits are the divergence; everything after is a different request).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from experiments.engine import Request

CAUSES = ("arithmetic", "structural", "amplified")


@dataclass
class Divergence:
    n_compared: int                   # positions compared
    logits_differ: torch.Tensor       # [n] bool
    routes_differ: torch.Tensor       # [n] bool, any layer
    causes: list                      # [n] a CAUSES entry or None
    max_abs_delta: float
    mean_abs_delta: float
    completion_differs: bool
    first_divergence: int | None      # index into the generated tokens
    flipped_margins: torch.Tensor     # reference margins of primary flips (see below)
    cascade_flips: int                # flips downstream of an earlier routing difference
    unflipped_margins: torch.Tensor   # reference margins of choices that held

    def cause_counts(self) -> dict[str, int]:
        return {c: sum(1 for x in self.causes if x == c) for c in CAUSES}


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def attribute_divergence(ref: Request, test: Request) -> Divergence:
    """Compare a tracked request with its reference run, token by token, and name each cause."""
    if ref.prompt != test.prompt:
        raise ValueError("ref and test must be runs of the same prompt")
    n = min(_first_difference(ref.tokens, test.tokens), len(ref.tokens) - 1, len(test.tokens) - 1)
    ref_logits, test_logits = ref.token_logits()[:n], test.token_logits()[:n]
    rr, tr = ref.token_routes(), test.token_routes()
    kept_diff = (rr.kept[:n] != tr.kept[:n]).any(-1)                       # [n, L]
    pref_diff = (rr.preferred[:n] != tr.preferred[:n]).any(-1)             # [n, L]
    # causality: position j sees every earlier position, so accumulate differences along positions
    seen_route = torch.cummax(kept_diff.int(), 0).values.bool()            # [n, L]
    seen_struct = torch.cummax((kept_diff & ~pref_diff).int(), 0).values.bool()
    # a *primary* flip is a top-k choice that flipped with no routing difference in an earlier layer at
    # this or an earlier position (what its router input depends on): only drift in the numbers can
    # explain it, so its margin measures how near a tie must be to flip. Other flips are cascades.
    earlier = torch.zeros_like(seen_route)
    earlier[:, 1:] = torch.cummax(seen_route.int(), 1).values.bool()[:, :-1]
    primary = pref_diff & ~earlier
    logits_differ = (ref_logits != test_logits).any(-1)
    causes = []
    for j in range(n):
        if not logits_differ[j]:
            causes.append(None)
        elif not seen_route[j].any():
            causes.append("arithmetic")
        else:
            first_layer = int(seen_route[j].int().argmax())
            causes.append("structural" if seen_struct[j, first_layer] else "amplified")
    delta = (ref_logits - test_logits).abs()
    gen_ref, gen_test = ref.generated, test.generated
    first = _first_difference(gen_ref, gen_test)
    return Divergence(
        n_compared=n, logits_differ=logits_differ, routes_differ=kept_diff.any(-1), causes=causes,
        max_abs_delta=float(delta.max()) if n else 0.0, mean_abs_delta=float(delta.mean()) if n else 0.0,
        completion_differs=gen_ref != gen_test, first_divergence=first if gen_ref != gen_test else None,
        flipped_margins=rr.margin[:n][primary], cascade_flips=int((pref_diff & ~primary).sum()),
        unflipped_margins=rr.margin[:n][~pref_diff])
