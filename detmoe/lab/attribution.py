"""Attribute every divergence between a reference run and a test run of the same request.

A token *diverges* when its logits differ bitwise from the reference. Its cause:
- `arithmetic`: routing that can reach this token (its own, at every layer; an earlier token's, at
  every layer but the last, through attention) was identical to the reference; only the reduction
  order of some kernel differed.
- `structural`: routing differed, and at the first layer where it did, the earliest differing token
  kept its own top-k preference but lost or gained an expert: another request took the slot
  (capacity, expert choice).
- `amplified`: routing differed, and at the first such layer the earliest differing token's own
  top-k choice flipped: slightly different numbers crossed a near tie. The reference top-k margin of
  each primary flip (one with nothing different upstream of its router) is recorded.
- `collective` (test runs on a parallel layout): the same batch on one device gives this token the
  reference's bits, so only the cross-rank sums of the layout moved it (their rounding, or a near tie
  they tipped).

Only positions whose inputs agree are compared: the prompt, then generated tokens up to and including
the first one that differs (its logits are the divergence; everything after is a different request).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from detmoe.moe.engine import Request, TokenRoutes

CAUSES = ("arithmetic", "structural", "amplified", "collective")


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


def _causes_of(divergent: list[int], route_diff: torch.Tensor,
               pref_diff: torch.Tensor) -> dict[int, tuple[str, tuple[int, int] | None]]:
    """Cause of each divergent token j, and the routing difference that decided it ((position, layer);
    None for `arithmetic`). What reaches its logits: its own routing at every layer, and an earlier
    token's routing at every layer but the last (that reaches j only through attention in a later layer).
    The first such layer with a difference decides, by its earliest differing token: a flipped preference
    there is `amplified`, a lost or gained slot `structural`.

    The earliest differing token of a layer is the same for every j at or after it, so it is found once
    per layer (not by a scan per token, which cost O(n^2 L) element reads: minutes for a probe of 1000
    tokens that drifts everywhere), and the masks are read on the host once."""
    n, L = route_diff.shape
    route, pref = route_diff.tolist(), pref_diff.tolist()
    # per layer but the last, the earliest position whose routing differs (n: none)
    first = [next((i for i in range(n) if route[i][layer]), n) for layer in range(L - 1)]
    out = {}
    for j in divergent:
        layer = next((layer for layer in range(L - 1) if first[layer] <= j), None)
        if layer is not None:
            i = first[layer]
            out[j] = ("amplified" if pref[i][layer] else "structural", (i, layer))
        elif route[j][L - 1]:       # the last layer: only the token's own routing reaches its logits
            out[j] = ("amplified" if pref[j][L - 1] else "structural", (j, L - 1))
        else:
            out[j] = ("arithmetic", None)
    return out


@dataclass
class RoutingAttribution:
    """What the routing says of one request's compared positions (any model: ours or a traced one)."""
    routes_differ: torch.Tensor       # [n] bool, any layer
    causes: list                      # [n] a CAUSES entry (None where the output did not diverge)
    sites: list                       # [n] the routing difference that decided it: (position, layer) or None
    flipped_margins: torch.Tensor     # reference margins of primary flips
    cascade_flips: int                # flips downstream of an earlier routing difference
    unflipped_margins: torch.Tensor   # reference margins of choices that held
    primary: torch.Tensor             # [n, L] bool: the primary flips


def attribute_routing(differs: torch.Tensor, ref: TokenRoutes, test: TokenRoutes) -> RoutingAttribution:
    """The cause of each divergent position (differs [n] bool: its output's bits moved) from both runs'
    routing records over the same n positions: `arithmetic`, `structural` or `amplified` (see above),
    and the primary flips with their reference margins.

    A *primary* flip is a top-k choice that flipped with no routing difference upstream of its router
    input (an earlier layer, at this or an earlier position): only drift in the numbers explains it, so
    its margin measures how near a tie must be to flip. Other flips are cascades."""
    n = differs.shape[0]
    kept_diff = (ref.kept[:n] != test.kept[:n]).any(-1)                     # [n, L]
    pref_diff = (ref.preferred[:n] != test.preferred[:n]).any(-1)           # [n, L]
    # a flip onto an expert that is dropped in both runs leaves the kept set alone but still changes
    # the weights: a routing difference too
    route_diff = kept_diff | pref_diff
    seen = torch.cummax(route_diff.int(), 0).values.bool()                 # [n, L] at this or an earlier position
    upstream = torch.zeros_like(seen)
    upstream[:, 1:] = torch.cummax(seen.int(), 1).values.bool()[:, :-1]
    primary = pref_diff & ~upstream
    divergent = differs.nonzero().flatten().tolist()
    by_token = _causes_of(divergent, route_diff, pref_diff)
    return RoutingAttribution(
        routes_differ=route_diff.any(-1), causes=[by_token.get(j, (None, None))[0] for j in range(n)],
        sites=[by_token.get(j, (None, None))[1] for j in range(n)],
        flipped_margins=ref.margin[:n][primary], cascade_flips=int((pref_diff & ~primary).sum()),
        unflipped_margins=ref.margin[:n][~pref_diff], primary=primary)


def attribute_divergence(ref: Request, test: Request, same_batch: Request | None = None) -> Divergence:
    """Compare a tracked request with its reference run, token by token, and name each cause.

    `same_batch`: for a test run on a parallel layout, the same batch on one device. A divergent token
    whose logits that run reproduces bitwise moved because of the layout alone: `collective`."""
    if ref.prompt != test.prompt:
        raise ValueError("ref and test must be runs of the same prompt")
    n = min(_first_difference(ref.tokens, test.tokens), len(ref.tokens) - 1, len(test.tokens) - 1)
    ref_logits, test_logits = ref.token_logits()[:n], test.token_logits()[:n]
    logits_differ = (ref_logits != test_logits).any(-1)
    routing = attribute_routing(logits_differ, ref.token_routes(), test.token_routes())
    causes = routing.causes
    if same_batch is not None:
        m = min(n, _first_difference(ref.tokens, same_batch.tokens), len(same_batch.tokens) - 1)
        batch_alone_equal = (same_batch.token_logits()[:m] == ref_logits[:m]).all(-1).tolist()
        causes = [("collective" if c is not None and j < m and batch_alone_equal[j] else c)
                  for j, c in enumerate(causes)]
    delta = (ref_logits - test_logits).abs()
    gen_ref, gen_test = ref.generated, test.generated
    first = _first_difference(gen_ref, gen_test)
    return Divergence(
        n_compared=n, logits_differ=logits_differ, routes_differ=routing.routes_differ, causes=causes,
        max_abs_delta=float(delta.max()) if n else 0.0, mean_abs_delta=float(delta.mean()) if n else 0.0,
        completion_differs=gen_ref != gen_test, first_divergence=first if gen_ref != gen_test else None,
        flipped_margins=routing.flipped_margins, cascade_flips=routing.cascade_flips,
        unflipped_margins=routing.unflipped_margins)
