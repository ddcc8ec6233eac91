"""Find a `transformers` causal-LM's decoder layers and, in each MoE layer, its router and its experts, by
the model's structure rather than by a list of model classes.

What transformers' MoE models share (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS and
many more; transformers 5): an *experts* module whose forward takes the hidden states, the chosen experts
and their weights (`forward(hidden_states, top_k_index, top_k_weights)` and its spellings), called by a
*block* that first calls its *router*, a sibling holding a [n_experts, d_model] weight (`gate`,
`router`, `router.classifier`). Encoder-decoder models (Switch) are refused. The decoder layers are the
model's longest `nn.ModuleList` of at most two classes (dense and MoE layers) that holds such blocks;
layers without one (DeepSeek's first dense layers) are traced as dense.

Not recognised: experts whose forward does not take the routing as arguments (experts called one by one
in a Python loop of `nn.Linear`s, the older transformers 4 style); `find_structure` names what it found
and what it missed.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

# the routing arguments of an experts forward: an index name and a weight name (transformers spells them
# top_k_index / top_k_weights, router_indices / routing_weights, selected_experts / routing_weights)
_INDEX_ARG = re.compile(r"ind|selected|expert", re.I)
_WEIGHT_ARG = re.compile(r"weight|score|prob", re.I)


@dataclass
class MoEParts:
    """One MoE layer: the block, its router and its experts (qualified names in the model)."""
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    n_experts: int
    block_name: str
    router_name: str
    experts_name: str


@dataclass
class Structure:
    layers: nn.ModuleList
    layers_name: str
    moe: dict[int, MoEParts]            # layer index -> its MoE parts (dense layers absent)
    head: Optional[nn.Module]           # the LM head (output embeddings), if the model has one

    def describe(self) -> str:
        moe = ", ".join(f"{i}: {p.block_name} (router {p.router_name.rsplit('.', 1)[-1]}, "
                        f"{p.n_experts} experts)" for i, p in list(self.moe.items())[:2])
        more = f", ... ({len(self.moe)} MoE layers of {len(self.layers)})" if len(self.moe) > 2 else ""
        return f"decoder layers {self.layers_name} [{len(self.layers)}]; MoE layers {moe}{more}"


def takes_routing(module: nn.Module) -> bool:
    """Does this module's forward take (hidden states, chosen experts, their weights)?"""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return (len(names) >= 3 and any(_INDEX_ARG.search(n) for n in names[1:])
            and any(_WEIGHT_ARG.search(n) for n in names[1:]))


def expert_count(experts: nn.Module) -> Optional[int]:
    """E of an experts module: its num_experts attribute, else the leading dim its 3-D weights share,
    else its number of sub-modules (an nn.ModuleDict of experts)."""
    for attr in ("num_experts", "num_local_experts", "n_experts"):
        if isinstance(getattr(experts, attr, None), int):
            return getattr(experts, attr)
    dims = {p.shape[0] for p in experts.parameters(recurse=False) if p.dim() == 3}
    if len(dims) == 1:
        return dims.pop()
    children = list(experts.children())
    return len(children) or None


def find_router(block: nn.Module, experts: nn.Module, n_experts: int) -> Optional[tuple[str, nn.Module]]:
    """The block's child (or grandchild) holding a [n_experts, d] weight, other than the experts: the router.
    Where several do (a shared expert of width E, by chance), one named like a router wins."""
    found = []
    for name, child in block.named_children():
        if child is experts:
            continue
        for _, p in child.named_parameters():
            if p.dim() == 2 and p.shape[0] == n_experts:
                found.append((name, child))
                break
    if len(found) > 1:
        named = [(n, c) for n, c in found if re.search(r"gate$|router", n) and "shared" not in n]
        found = named or found
    return found[0] if found else None


def find_structure(model: nn.Module) -> Structure:
    """The decoder layers and MoE parts of `model`; a ValueError naming what is missing otherwise."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model: detmoe.diagnose traces decoder-only "
                         "causal LMs")
    names = {id(m): n for n, m in model.named_modules()}
    experts_mods = [m for m in model.modules() if takes_routing(m)]
    if not experts_mods:
        raise ValueError(f"{type(model).__name__}: no MoE experts module found (none whose forward takes the "
                         "hidden states, the chosen experts and their weights, as most of transformers' MoE "
                         "models do; experts called one by one, or a dense model, are not traced)")
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and len({type(c) for c in m}) <= 2]
    holds = lambda layer: any(e is m for m in layer.modules() for e in experts_mods)
    lists = [(n, m) for n, m in lists if any(holds(c) for c in m)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: found experts modules ({names[id(experts_mods[0])]}) but no "
                         "nn.ModuleList of decoder layers holding them")
    layers_name, layers = max(lists, key=lambda nm: len(nm[1]))
    moe: dict[int, MoEParts] = {}
    for i, layer in enumerate(layers):
        for block in layer.modules():
            experts = next((c for c in block.children() if any(c is e for e in experts_mods)), None)
            if experts is None:
                continue
            E = expert_count(experts)
            router = find_router(block, experts, E) if E else None
            if router is None:
                raise ValueError(f"{names[id(block)]}: found its experts ({names[id(experts)]}) but no router "
                                 f"beside them (a child holding a [{E}, d_model] weight)")
            moe[i] = MoEParts(block, router[1], experts, E, names[id(block)], names[id(router[1])],
                              names[id(experts)])
            break
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return Structure(layers, layers_name, moe, head)
