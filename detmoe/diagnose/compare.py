"""Compare two traces of the same request and say, for each token whose output moved, where and why.

    ref = record(model, ids[:1])                              # the request alone
    other = record(model, batch_ids, batch_mask)              # the same request as row 5 of a padded batch
    report = compare(ref, other, other_row=5)
    print(report.summary())

The request's real tokens are aligned in order (padding skipped, so left and right padding, another
batch size, another dtype or device all compare), up to the first token whose id differs (a generated
token that differs starts another request). A token *diverges* when its logits' bits differ (where one
run did not compute them, e.g. generate's prompt tokens, its last decoder layer's output). Its cause,
with the definitions of the ablation (detmoe/lab/attribution.py, whose code this uses):
- `padding`: the batch's padding changed the token's inputs, not only the arithmetic: its position, or an
  earlier token's, differs (positions counted from the padding, say).
- `arithmetic`: every routing decision that can reach the token was identical; only the reduction order
  of some kernel differed.
- `amplified`: a top-k choice flipped at a near tie: slightly different numbers crossed it. The reference
  margin of each primary flip (nothing different upstream of its router) is recorded; flips downstream
  of an earlier difference are counted apart as cascades.
- `structural`: a token kept its own choice but lost or gained an expert slot: another request took it
  (a capacity-limited router).
For each divergent token it also names the first decoder layer where its hidden state's bits differ and,
in that layer, the first module (in the order they ran) whose output for it differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from detmoe.diagnose.trace import Trace
from detmoe.lab.attribution import attribute_routing
from detmoe.moe.engine import TokenRoutes

CAUSES = ("padding", "arithmetic", "amplified", "structural")


@dataclass
class TokenDivergence:
    """One token whose logits moved."""
    position: int                      # among the request's real tokens
    token: int                         # its id
    cause: str                         # a CAUSES entry
    first_layer: Optional[int]         # the first decoder layer whose output for it differs (None: none did)
    first_module: Optional[str]        # the first module of that layer whose output for it differs
    decided_at: Optional[tuple]        # (position, decoder layer) of the routing difference that decided it
    margin: Optional[float]            # the reference top-k margin there (amplified: how near the tie was)


@dataclass
class Comparison:
    """Two traces of one request, token by token (see the module docstring)."""
    model: str
    n_compared: int
    divergent: list                    # TokenDivergence, in position order
    routes_differ: torch.Tensor        # [n] bool: any MoE layer's routing differs for the token
    flipped_margins: torch.Tensor      # reference margins of primary flips
    cascade_flips: int
    unflipped_margins: torch.Tensor    # reference margins of choices that held
    first_greedy_difference: Optional[int]   # first position whose next-token argmax differs
    max_abs_delta: Optional[float]     # largest |logit difference| (traces recorded with keep_tensors)

    @property
    def invariant(self) -> bool:
        return not self.divergent

    def cause_counts(self) -> dict[str, int]:
        return {c: sum(d.cause == c for d in self.divergent) for c in CAUSES}

    def first_layer_counts(self) -> dict:
        out: dict = {}
        for d in self.divergent:
            out[d.first_layer] = out.get(d.first_layer, 0) + 1
        return out

    def summary(self) -> str:
        """A few lines a person reads: how many tokens moved, the first one, where and why."""
        if self.invariant:
            return f"{self.model}: all {self.n_compared} tokens have the reference's bits"
        first = self.divergent[0]
        causes = ", ".join(f"{c} {n}" for c, n in self.cause_counts().items() if n)
        where = (f"first in decoder layer {first.first_layer}, module {first.first_module}"
                 if first.first_layer is not None else "in no decoder layer's output (the final norm or LM head)")
        why = first.cause + (f" (a top-k flip at position {first.decided_at[0]}, layer {first.decided_at[1]}, "
                             f"reference margin {first.margin:.3g})" if first.cause == "amplified" and
                             first.margin is not None else "")
        lines = [f"{self.model}: {len(self.divergent)} of {self.n_compared} tokens diverge ({causes})",
                 f"first divergent token: position {first.position} (id {first.token}), {where}; cause: {why}"]
        flips = [d for d in self.divergent if d.cause == "amplified" and d.decided_at is not None]
        if flips:
            sites = sorted({(d.decided_at, d.margin) for d in flips})
            (pos, layer), margin = sites[0]
            lines.append(f"{len(self.flipped_margins)} primary top-k flip(s), {self.cascade_flips} cascade(s); the "
                         f"first decisive one at position {pos}, decoder layer {layer}, reference margin {margin:.3g}")
        if self.first_greedy_difference is not None:
            lines.append(f"the greedy next token first differs at position {self.first_greedy_difference}")
        if self.max_abs_delta is not None:
            lines.append(f"max |logit difference| {self.max_abs_delta:.3g}")
        return "\n".join(lines)


def _routes(trace: Trace, row: int, idx: torch.Tensor) -> TokenRoutes:
    """The request's routing records, [n, M (+1), ...]. Where dense decoder layers follow the last MoE
    layer, an earlier token's routing there still reaches a later token (through their attention): a
    routing column that never differs is added after it, so the attribution treats the real last MoE
    layer as it treats any layer with layers after it."""
    kept, pref, margin = trace.kept[row, idx], trace.preferred[row, idx], trace.margin[row, idx]
    if trace.moe_layers and trace.moe_layers[-1] < trace.hidden.shape[0] - 1:
        kept = torch.cat([kept, torch.zeros_like(kept[:, :1])], 1)
        pref = torch.cat([pref, torch.zeros_like(pref[:, :1])], 1)
        margin = torch.cat([margin, torch.full_like(margin[:, :1], float("nan"))], 1)
    return TokenRoutes(kept, pref, margin)


def compare(reference: Trace, other: Trace, reference_row: int = 0, other_row: int = 0) -> Comparison:
    """The request in `reference_row` of `reference` against the same request in `other_row` of `other`."""
    if (reference.structure != other.structure or reference.kept.shape[2:] != other.kept.shape[2:]
            or reference.preferred.shape[2:] != other.preferred.shape[2:]):
        raise ValueError(f"the traces come from different models ({reference.structure} vs {other.structure})")
    ri, oi = reference.positions_of(reference_row), other.positions_of(other_row)
    rt, ot = reference.input_ids[reference_row, ri], other.input_ids[other_row, oi]
    m = min(len(ri), len(oi))
    same = (rt[:m] == ot[:m]).tolist()
    n = next((j for j, s in enumerate(same) if not s), m)
    if n == 0:
        raise ValueError(f"reference row {reference_row} and other row {other_row} are not the same request: "
                         f"their first real tokens are {rt[:1].tolist()} and {ot[:1].tolist()}")
    ri, oi = ri[:n], oi[:n]
    # a token's output: its logits where both runs computed them, else its last decoder layer's output
    both = reference.has_logits[reference_row, ri] & other.has_logits[other_row, oi]
    differs = torch.where(both, reference.logits[reference_row, ri] != other.logits[other_row, oi],
                          reference.hidden[-1, reference_row, ri] != other.hidden[-1, other_row, oi])   # [n]
    routing = attribute_routing(differs, _routes(reference, reference_row, ri), _routes(other, other_row, oi))
    # padding: a token's inputs changed when its own or an earlier token's position did
    moved = torch.zeros(n, dtype=torch.bool)
    if reference.positions is not None and other.positions is not None:
        pos_diff = reference.positions[reference_row, ri] != other.positions[other_row, oi]
        moved = torch.cummax(pos_diff.int(), 0).values.bool()
    hidden_diff = reference.hidden[:, reference_row, ri] != other.hidden[:, other_row, oi]      # [L, n]
    modules = [name for name in reference.modules if name in other.modules]
    divergent = []
    for j in differs.nonzero().flatten().tolist():
        layers = hidden_diff[:, j].nonzero().flatten()
        first_layer = int(layers[0]) if len(layers) else None
        first_module = next((name for name in modules if reference.module_layer[name] == first_layer and
                             reference.modules[name][reference_row, ri[j]] != other.modules[name][other_row, oi[j]]),
                            None)
        site = routing.sites[j]
        cause = "padding" if moved[j] else routing.causes[j]
        decided = None if site is None or cause == "padding" else (site[0], reference.moe_layers[site[1]])
        margin = float(reference.margin[reference_row, ri[site[0]], site[1]]) if decided is not None else None
        divergent.append(TokenDivergence(j, int(rt[j]), cause, first_layer, first_module, decided, margin))
    greedy = (both & (reference.next_token[reference_row, ri] != other.next_token[other_row, oi])).nonzero().flatten()
    delta = None
    if "logits" in reference.tensors and "logits" in other.tensors:
        d = (reference.tensors["logits"][reference_row, ri] - other.tensors["logits"][other_row, oi]).abs()[both]
        delta = float(d.max()) if d.numel() else 0.0
    return Comparison(
        model=reference.model, n_compared=n, divergent=divergent, routes_differ=routing.routes_differ,
        flipped_margins=routing.flipped_margins, cascade_flips=routing.cascade_flips,
        unflipped_margins=routing.unflipped_margins,
        first_greedy_difference=int(greedy[0]) if len(greedy) else None, max_abs_delta=delta)
