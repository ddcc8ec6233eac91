"""Record what a `transformers` MoE model computed for every token, through forward hooks that only read.

    trace = record(model, input_ids, attention_mask)          # one forward
    with recording(model) as rec:                             # or any number of them: generate's steps
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=16, do_sample=False)
    trace = rec.trace()

A `Trace` holds, for every token fed to the model (rows of the batch; a generate's steps appended in
order): its id and whether it was real (the attention mask) or padding; a fingerprint of its position
embedding; a fingerprint of its hidden state after every decoder layer and of its output of every
module of a layer (norms, attention, the MoE block, its router, experts and shared experts, in the
order they ran); a fingerprint of its logits and their argmax (where the model computed them: generate computes a prompt's last token's only); and for
every MoE layer its routing: the
experts it kept, its own choice (preferred), their weights and the top-k margin. Fingerprints are
bitwise: two tokens' hidden states have the same fingerprint when they have the same bits (a hash of the
row's bit patterns: `fingerprint_rows`). The tensors
themselves are kept on request (`keep_tensors`: the hidden states and logits, for deltas).

The hooks never write to what they read, so a recorded run gives the bits of an unrecorded one
(tested). The model's code runs unchanged: nothing of it is edited or patched, and the hooks are
removed when the recording ends.

Legend: B = rows, N = tokens fed per row, L = decoder layers, M = MoE layers, E = experts, k = top-k.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn as nn

from detmoe.diagnose.fingerprint import FLOATS as _FLOATS, fingerprint_rows
from detmoe.diagnose.structure import Structure, find_structure

@dataclass
class Trace:
    """What one model computed for each token of a batch (see the module docstring). Per-token arrays are
    [B, N] (a step's tokens appended after the previous step's); routing arrays [B, N, M, ...]."""
    model: str
    structure: str
    input_ids: torch.Tensor            # [B, N] long
    real: torch.Tensor                 # [B, N] bool: the attention mask of the fed tokens
    positions: Optional[torch.Tensor]  # [B, N] int64: the positions the decoder layers were given
    hidden: torch.Tensor               # [L, B, N] int64 fingerprints of each decoder layer's output
    modules: dict                      # qualified module name -> [B, N] int64 fingerprints, in run order
    module_layer: dict                 # qualified module name -> its decoder layer
    logits: torch.Tensor               # [B, N] int64 fingerprints of the logits (0 where none were computed)
    next_token: torch.Tensor           # [B, N] long: the logits' argmax (-1 where none were computed)
    has_logits: torch.Tensor           # [B, N] bool: logits computed (generate computes a prompt's last only)
    moe_layers: list                   # the decoder layers that route (M of them)
    kept: torch.Tensor                 # [B, N, M, E] bool: experts that processed the token
    preferred: torch.Tensor            # [B, N, M, k] long: its own choice, sorted
    weights: torch.Tensor              # [B, N, M, k] float32: the chosen experts' weights, in `preferred` order
    margin: torch.Tensor               # [B, N, M] float32: the router softmax's gap, last chosen vs first not
                                       # (NaN where the router chose otherwise than the softmax's top k)
    tensors: dict = field(default_factory=dict)   # on request: "hidden" [L, B, N, D], "logits" [B, N, V]

    def positions_of(self, row: int) -> torch.Tensor:
        """The indices (into N) of row's real tokens, in order."""
        if not 0 <= row < self.input_ids.shape[0]:
            raise ValueError(f"row must be in 0..{self.input_ids.shape[0] - 1}, got {row}")
        return self.real[row].nonzero().flatten()

    def tokens(self, row: int) -> list[int]:
        """Row's real token ids, in order."""
        return self.input_ids[row, self.positions_of(row)].tolist()


# a model's structure, found once (finding it inspects every module's forward: milliseconds a record)
_STRUCTURES: "weakref.WeakKeyDictionary[nn.Module, tuple[int, Structure]]" = weakref.WeakKeyDictionary()


def _structure_of(model: nn.Module) -> Structure:
    """The cached structure while the model still holds those very modules (one swapped, added or removed
    since: found again)."""
    n_modules = sum(1 for _ in model.modules())
    cached = _STRUCTURES.get(model)
    if cached is not None:
        count, s = cached
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        held = {id(m) for m in model.modules()}
        parts = [s.layers, *(m for p in s.moe.values() for m in (p.block, p.router, p.experts))]
        if count != n_modules or head is not s.head or not all(id(m) in held for m in parts):
            cached = None
    if cached is None:
        cached = _STRUCTURES[model] = (n_modules, find_structure(model))
    return cached[1]


class _Step:
    """What the hooks collect during one forward."""

    def __init__(self, input_ids: torch.Tensor, real: torch.Tensor):
        self.input_ids, self.real = input_ids, real
        self.positions: Optional[torch.Tensor] = None
        self.hidden: dict[int, torch.Tensor] = {}
        self.modules: dict[str, torch.Tensor] = {}
        self.router_logits: dict[int, torch.Tensor] = {}
        self.router_choice: dict[int, Optional[torch.Tensor]] = {}
        self.choice: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.logits: Optional[torch.Tensor] = None
        self.next_token: Optional[torch.Tensor] = None
        self.has_logits: Optional[torch.Tensor] = None
        self.tensors: dict[str, list] = {}


def _tensor_of(output) -> Optional[torch.Tensor]:
    """A module's main output: the tensor itself, or the first tensor of a tuple (attention's output)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    return getattr(output, "last_hidden_state", None)


def _per_token(t: torch.Tensor, B: int, L: int) -> Optional[torch.Tensor]:
    """t as [B, L, ...] when its leading dims are the step's tokens ([B, L, ...] or [B*L, ...])."""
    if t.dim() >= 2 and tuple(t.shape[:2]) == (B, L):
        return t
    if t.dim() >= 1 and t.shape[0] == B * L:
        return t.reshape(B, L, *t.shape[1:])
    return None


def _fp(t: torch.Tensor, B: int, L: int) -> Optional[torch.Tensor]:
    t = _per_token(t, B, L)
    if t is None or t.dtype not in _FLOATS:
        return None
    return fingerprint_rows(t.reshape(B, L, -1))


class Recorder:
    """The hooks of one recording; `trace()` assembles what they saw."""

    def __init__(self, model: nn.Module, keep_tensors: bool = False):
        self.model, self.keep_tensors = model, keep_tensors
        self.structure: Structure = _structure_of(model)
        self.steps: list[_Step] = []
        self.handles: list = []
        self.layer_of: dict[str, int] = {}

    # -- hooks --
    def _current(self) -> Optional[_Step]:
        return self.steps[-1] if self.steps else None

    def _on_model(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("detmoe.diagnose records forwards given input_ids (not inputs_embeds)")
        mask = kwargs.get("attention_mask")
        L = input_ids.shape[1]
        real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask[:, -L:].bool()
        self.steps.append(_Step(input_ids.detach(), real))

    def _on_first_layer(self, module, args, kwargs):
        # the positions the layers were given (position_ids, else the cache positions): integers, so two
        # dtypes or devices, whose rotary tables differ in their bits, compare
        step = self._current()
        if step is None:
            return
        B, L = step.input_ids.shape
        ids = kwargs.get("position_ids")
        if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[-1] == L):
            ids = kwargs.get("cache_position")
            ids = ids[None] if isinstance(ids, torch.Tensor) and ids.dim() == 1 and ids.shape[0] == L else None
        if ids is not None:
            step.positions = ids.expand(B, L).to(torch.int64)

    def _on_layer(self, index: int):
        def hook(module, args, output):
            step = self._current()
            if step is None:
                return
            B, L = step.input_ids.shape
            h = _tensor_of(output)
            fp = _fp(h, B, L) if h is not None else None
            if fp is None:
                raise ValueError(f"decoder layer {index} gave no [batch, tokens, d_model] hidden state")
            step.hidden[index] = fp
            if self.keep_tensors:
                step.tensors.setdefault("hidden", {})[index] = _per_token(h, B, L).detach().float().cpu()
        return hook

    def _on_module(self, name: str):
        def hook(module, args, output):
            step = self._current()
            if step is None or name in step.modules:          # its first call in the step only
                return
            t = _tensor_of(output)
            fp = _fp(t, *step.input_ids.shape) if t is not None else None
            if fp is not None:
                step.modules[name] = fp
        return hook

    def _on_router(self, moe_index: int, n_experts: int):
        def hook(module, args, output):
            step = self._current()
            if step is None:
                return
            outs = [o for o in (output if isinstance(output, (tuple, list)) else (output,)) if isinstance(o, torch.Tensor)]
            logits = next((o for o in outs if o.is_floating_point() and o.shape[-1] == n_experts), None)
            # its own choice, where it returns one as ids (not a dispatch mask after capacity, as Switch's)
            ids = next((o for o in outs if not o.is_floating_point() and o.dim() == 2 and o.shape[-1] != n_experts), None)
            if logits is not None:
                step.router_logits[moe_index] = logits.detach().reshape(-1, n_experts).float()
                step.router_choice[moe_index] = None if ids is None else ids.detach()
        return hook

    def _on_experts(self, moe_index: int, n_experts: int):
        def hook(module, args, kwargs):
            step = self._current()
            if step is None:
                return
            values = list(args[1:]) + list(kwargs.values())
            index = next((v for v in values if isinstance(v, torch.Tensor) and not v.is_floating_point()), None)
            weight = next((v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
            if index is None or weight is None:
                raise ValueError(f"MoE layer {moe_index}: its experts were called without the chosen experts "
                                 "and their weights")
            step.choice[moe_index] = (index.detach(), weight.detach())
        return hook

    def _on_head(self, module, args, output):
        step = self._current()
        if step is None or not isinstance(output, torch.Tensor) or output.dim() != 3:
            return
        B, L = step.input_ids.shape
        kept = output.shape[1]      # generate asks for the last token's logits only (logits_to_keep)
        if output.shape[0] != B or kept > L:
            return
        step.logits = torch.zeros(B, L, dtype=torch.int64, device=output.device)
        step.next_token = torch.full((B, L), -1, dtype=torch.long, device=output.device)
        step.has_logits = torch.zeros(B, L, dtype=torch.bool, device=output.device)
        step.logits[:, L - kept:] = fingerprint_rows(output)
        step.next_token[:, L - kept:] = output.argmax(-1)
        step.has_logits[:, L - kept:] = True
        if self.keep_tensors:
            full = torch.full((B, L, output.shape[2]), float("nan"))
            full[:, L - kept:] = output.detach().float().cpu()
            step.tensors["logits"] = full

    def attach(self) -> None:
        s = self.structure
        on = self.handles.append
        on(self.model.register_forward_pre_hook(self._on_model, with_kwargs=True))
        on(s.layers[0].register_forward_pre_hook(self._on_first_layer, with_kwargs=True))
        names = {id(m): n for n, m in self.model.named_modules()}
        for i, layer in enumerate(s.layers):
            on(layer.register_forward_hook(self._on_layer(i)))
            parts = s.moe.get(i)
            watched = list(layer.children()) + (list(parts.block.children()) if parts else [])
            for child in watched:
                name = names[id(child)]
                self.layer_of[name] = i
                on(child.register_forward_hook(self._on_module(name)))
        for m, (i, parts) in enumerate(s.moe.items()):
            on(parts.router.register_forward_hook(self._on_router(m, parts.n_experts)))
            on(parts.experts.register_forward_pre_hook(self._on_experts(m, parts.n_experts), with_kwargs=True))
        if s.head is not None:
            on(s.head.register_forward_hook(self._on_head))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # -- assembly --
    def trace(self) -> Trace:
        if not self.steps:
            raise ValueError("nothing was recorded: run the model inside `recording(model)`")
        s = self.structure
        moe_layers = list(s.moe)
        steps = self.steps
        for n, st in enumerate(steps):
            missing = [i for i in range(len(s.layers)) if i not in st.hidden]
            if missing or st.logits is None:
                raise ValueError(f"forward {n} recorded no hidden state of layers {missing}" if missing else
                                 f"forward {n} recorded no logits (the model's output embeddings did not run)")
        routes = [_routing_of(st, len(moe_layers), [p.n_experts for p in s.moe.values()]) for st in steps]
        module_names = [n for n in steps[0].modules if all(n in st.modules for st in steps)]
        # assembled on the model's device, then moved in a few transfers (not one per layer and module)
        cat = lambda xs: torch.cat(list(xs), dim=1)
        fps = torch.cat([torch.stack([t.to(st.input_ids.device) for t in
                                      [st.hidden[i] for i in range(len(s.layers))]
                                      + [st.modules[n] for n in module_names] + [st.logits]]) for st in steps], 2).cpu()
        L = len(s.layers)
        routing = [cat(r[i] for r in routes).cpu() for i in range(4)]
        trace = Trace(
            model=type(self.model).__name__, structure=s.describe(),
            input_ids=cat(st.input_ids for st in steps).cpu(), real=cat(st.real for st in steps).cpu(),
            positions=(cat(st.positions for st in steps).cpu()
                       if all(st.positions is not None for st in steps) else None),
            hidden=fps[:L], modules={n: fps[L + i] for i, n in enumerate(module_names)},
            module_layer={n: self.layer_of[n] for n in module_names}, logits=fps[-1],
            next_token=cat(st.next_token for st in steps).cpu(), has_logits=cat(st.has_logits for st in steps).cpu(),
            moe_layers=moe_layers, kept=routing[0], preferred=routing[1], weights=routing[2], margin=routing[3])
        if self.keep_tensors:
            trace.tensors["hidden"] = torch.cat([torch.stack([st.tensors["hidden"][i] for i in range(len(s.layers))])
                                                 for st in steps], 2)
            trace.tensors["logits"] = torch.cat([st.tensors["logits"] for st in steps], 1)
        return trace


def _routing_of(step: _Step, M: int, n_experts: list[int]) -> tuple[torch.Tensor, ...]:
    """(kept [B, L, M, E], preferred [B, L, M, k], weights [B, L, M, k], margin [B, L, M]) of one step."""
    B, L = step.input_ids.shape
    kept, preferred, weights, margin = [], [], [], []
    for m in range(M):
        if m not in step.choice or m not in step.router_logits:
            raise ValueError(f"MoE layer {m}: its router or experts did not run in a forward")
        E = n_experts[m]
        index, weight = step.choice[m]                   # what the experts were given: the kept choices
        scores = torch.softmax(step.router_logits[m], dim=-1)                           # [T, E]
        w = weight.reshape(B * L, -1).float()
        if index.dim() == 2:                      # ids [T, k]; an id outside 0..E-1 is a dropped slot
            ids = index.reshape(B * L, -1).long()
            valid = (ids >= 0) & (ids < E)
            mask = torch.zeros(B * L, E + 1, dtype=torch.bool, device=ids.device)
            mask = mask.scatter_(1, torch.where(valid, ids, E), True)[:, :E]
        else:                                     # a dispatch mask [T, ..., E] after capacity (Switch)
            mask = index.reshape(B * L, -1, E).bool().any(1)
        own = step.router_choice.get(m)           # the router's own choice, before any drop
        if own is None:                           # none returned: its top k, k as many as the experts got
            k = index.reshape(B * L, -1).shape[1] if index.dim() == 2 else w.shape[1]
            own = scores.topk(k, dim=-1).indices
        own = own.reshape(B * L, -1).long()
        own_sorted, order = own.sort(dim=1)
        w = w.gather(1, order) if w.shape[1] == own.shape[1] else w
        chosen = torch.zeros_like(mask).scatter_(1, own, True)
        lowest_chosen = scores.masked_fill(~chosen, float("inf")).min(dim=1).values
        highest_other = scores.masked_fill(chosen, float("-inf")).max(dim=1).values
        # routers that choose by other scores (a bias, groups: DeepSeek-V3, GLM4-MoE, Ernie 4.5) need not
        # choose the softmax's top k: there the softmax margin says nothing of how near a tie was
        lowest_chosen = torch.where(lowest_chosen >= highest_other, lowest_chosen, float("nan"))
        # on the inputs' device: a model spread over GPUs (device_map) has its layers on several
        device = step.input_ids.device
        kept.append(mask.reshape(B, L, E).to(device))
        preferred.append(own_sorted.reshape(B, L, -1).to(device))
        weights.append(w.reshape(B, L, -1).to(device))
        margin.append((lowest_chosen - highest_other).reshape(B, L).to(device))
    return (torch.stack(kept, 2), torch.stack(preferred, 2), torch.stack(weights, 2), torch.stack(margin, 2))


@contextlib.contextmanager
def recording(model: nn.Module, keep_tensors: bool = False) -> Iterator[Recorder]:
    """Record every forward of `model` inside the block (e.g. `model.generate(...)`); `rec.trace()` after."""
    rec = Recorder(model, keep_tensors)
    rec.attach()
    try:
        yield rec
    finally:
        rec.detach()


@torch.no_grad()
def record(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
           keep_tensors: bool = False, **forward_kwargs) -> Trace:
    """One forward of `model` on a batch ([B, N] ids; the mask marks real tokens), recorded."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be a [batch, tokens] integer tensor, got {input_ids!r}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        raise ValueError(f"attention_mask must be None or a tensor of input_ids' shape {tuple(input_ids.shape)}")
    with recording(model, keep_tensors) as rec:
        model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
    return rec.trace()
