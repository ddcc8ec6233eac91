"""detmoe's attention and experts in `transformers`' own registries, and the switch of one model to them
(with its norms, through the `kernels` layer mapping: detmoe/invariant/hub_layers.py).

transformers 5 looks a model's attention up in `AttentionInterface` (with its mask builder in
`AttentionMaskInterface`) by `config._attn_implementation`, and its experts in `ExpertsInterface` by
`config._experts_implementation`. `register()` adds detmoe's under the name "detmoe_invariant" (nothing
else changes: no model uses a name until asked), and `switched(model)` points one model at them for a
block, then back at what it had:

  * attention: the model's mask (causal with padding, from transformers' sdpa mask builder) and its
    query, key and value go to detmoe/invariant/attention.py: each row's real keys from its first one,
    detmoe's ragged attention kernel, so a request's bits do not depend on its padding or its batch;
  * experts: detmoe's expert sort, grouped SwiGLU GEMM, grouped down GEMM and ordered combine
    (detmoe/kernels), the kernels detmoe's own MoE layer runs.

What these cannot run (sliding windows, soft-capping, attention sinks or position biases, dropout in
training, value head dims unlike the keys'; experts with biases, interleaved gate/up, another activation,
a post-expert norm, expert parallelism) goes, after a warning (an error under strict), to the attention
implementation the model had before the switch, or to transformers' grouped experts: inside
`invariant_mode()` those run on the aten overrides, batch-invariant but, for attention, not padding-invariant.
A (sub-)model transformers cannot switch (its attention is its own code) is named in a warning too.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from typing import Callable, Iterator, Optional

import torch

from detmoe import kernels
from detmoe.invariant.aten_ops import AUTOGRAD, Unsupported, check_kernel_inputs, needs_grad
from detmoe.invariant.attention import allowed_from_mask, padded_attention
from detmoe.invariant.fallback import fall_back, override_body
from detmoe.invariant.hub_layers import kernelized_norms

NAME = "detmoe_invariant"


# keyword arguments transformers passes to attention functions that do not change what is computed
_INERT = frozenset({"position_ids", "use_cache", "output_router_logits", "cache_position", "output_attentions",
                    "past_key_values", "past_key_value", "layer_idx", "is_causal"})
# each config's attention implementation before the switch (for the fallback): id(config) -> name
_previous_attention: dict[int, str] = {}


def _own_attention(module: torch.nn.Module, mask: Optional[torch.Tensor], causal: bool, query: torch.Tensor,
                   Sk: int) -> tuple[Callable, Optional[torch.Tensor]]:
    """The attention function the module's model used before the switch, with the mask in its form: the
    modelling file's eager one (an additive mask) where that was "eager", else transformers' sdpa one (the
    boolean mask the switch's mask builder made)."""
    previous = _previous_attention.get(id(getattr(module, "config", None)), "sdpa")
    Sq, dtype, device = query.shape[2], query.dtype, query.device
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if previous == "eager" and eager is not None:
        if mask is None and causal and Sq > 1:   # the sdpa builder's "causal, no padding": eager needs it drawn
            q_pos = torch.arange(Sk - Sq, Sk, device=device)[:, None]
            mask = (torch.arange(Sk, device=device)[None, :] <= q_pos)[None, None]
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
        return eager, mask
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward, mask


def invariant_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                        scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                        softcap: Optional[float] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [B, H, Sq, D], key and value [B, Hkv, Sk, D]
    -> ([B, Sq, H, D], None)."""
    B, H, Sq, D = query.shape
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    with override_body(), kernels.use_backend("batch_invariant"):
        try:
            others = sorted(k for k, v in kwargs.items() if v is not None and k not in _INERT)
            if sliding_window is not None or softcap is not None or others:
                raise Unsupported("a sliding window, soft-capping or arguments the kernel does not take ("
                                  + ", ".join(others or ["sliding_window/softcap"]) + ")")
            if dropout > 0 and module.training:
                raise Unsupported("dropout in training")
            if query.numel() == 0 or key.numel() == 0:
                raise Unsupported("an empty batch")
            if needs_grad(query, key, value):
                raise Unsupported(AUTOGRAD)
            if value.shape != key.shape:
                raise Unsupported("values of another head dim than the keys")
            check_kernel_inputs(query, key, value)
            if attention_mask is None and not causal:     # bidirectional: every query sees every key
                allowed = torch.ones(B, Sq, key.shape[2], dtype=torch.bool, device=query.device)
            else:
                # transformers passes no mask for a causal batch without padding
                allowed, why = allowed_from_mask(attention_mask, attention_mask is None and Sq > 1, B, Sq,
                                                 key.shape[2])
                if why is not None:
                    raise Unsupported(why)
            out = padded_attention(query, key, value, allowed, D ** -0.5 if scaling is None else scaling,
                                   mask=attention_mask)
            if out is None:
                raise Unsupported("a mask other than attention over padded rows (each query sees its row's "
                                  "first real keys)")
            return out.transpose(1, 2).contiguous(), None
        except Unsupported as e:
            fall_back(f"{NAME} attention", str(e))
    attention, attention_mask = _own_attention(module, attention_mask, causal, query, key.shape[2])
    return attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                     sliding_window=sliding_window, softcap=softcap, **kwargs)


def _experts_unsupported(experts: torch.nn.Module) -> Optional[str]:
    from transformers.integrations.moe import _default_apply_gate
    # attributes of transformers' experts decorator; releases before one of them lacked its feature
    if not getattr(experts, "has_gate", True) or not getattr(experts, "is_concatenated", True) \
            or not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
        return "experts without a concatenated gate and up projection"
    if any(getattr(experts, a, False) for a in ("has_bias", "has_post_expert_norm", "_is_expert_parallel")):
        return "expert biases, a post-expert norm or expert parallelism"
    if getattr(type(experts), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        return "a gating function of the model's own"
    act = getattr(getattr(experts, "config", None), "hidden_act", None)
    if act not in ("silu", "swish"):
        return f"the activation {act!r} (the kernel fuses silu)"
    return None


def invariant_experts(experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts-function signature: hidden_states [T, D], top_k_index and top_k_weights [T, k]
    -> [T, D]: each token's experts in slot order, summed in fp32 in slot order."""
    with override_body(), kernels.use_backend("batch_invariant"):
        try:
            why = _experts_unsupported(experts)
            if why is not None:
                raise Unsupported(why)
            if needs_grad(hidden_states, experts.gate_up_proj, experts.down_proj):
                raise Unsupported(AUTOGRAD)
            transposed = getattr(experts, "is_transposed", False)
            w_gate_up = experts.gate_up_proj if transposed else experts.gate_up_proj.transpose(1, 2)
            w_down = experts.down_proj if transposed else experts.down_proj.transpose(1, 2)
            check_kernel_inputs(hidden_states, w_gate_up, w_down)
            S = top_k_index.shape[1]
            order, offsets = kernels.expert_sort(top_k_index.reshape(-1), experts.num_experts)
            act = kernels.grouped_swiglu(hidden_states, w_gate_up, offsets, order, S)   # [T*S, F]
            out = kernels.grouped_matmul(act, w_down, offsets)                         # [T*S, D]
            return kernels.ordered_combine(out, order, top_k_weights.float(), hidden_states.dtype)
        except Unsupported as e:
            fall_back(f"{NAME} experts", str(e))
    from transformers.integrations.moe import grouped_mm_experts_forward
    return grouped_mm_experts_forward(experts, hidden_states, top_k_index, top_k_weights)


def register() -> None:
    """Add detmoe's attention (with transformers' sdpa mask builder) and experts to transformers'
    registries under NAME. Idempotent; changes no model."""
    from transformers import AttentionInterface
    from transformers.integrations.moe import ExpertsInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, invariant_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    ExpertsInterface.register(NAME, invariant_experts)


def _has_experts_switch(model: torch.nn.Module) -> bool:
    return hasattr(model, "set_experts_implementation") and model._can_set_experts_implementation()


def _models(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model and its sub-models with configs of their own (a vision tower, a text model)."""
    return [m for m in model.modules() if hasattr(m, "config") and hasattr(m, "set_attn_implementation")]


_lock = threading.Lock()
_switched: dict[int, list] = {}   # id(model) -> [blocks open on it, what to put back]


def _switch(model: torch.nn.Module) -> contextlib.ExitStack:
    """Point every (sub-)model at NAME; returns what puts them back."""
    undo = contextlib.ExitStack()
    saved = [(m, m.config._attn_implementation, getattr(m.config, "_experts_implementation", None))
             for m in _models(model)]
    for m, attention, _ in saved:
        _previous_attention[id(m.config)] = attention
    model.set_attn_implementation(NAME)
    # the outer model first (it sets its sub-models too), then each sub-model that had its own
    undo.callback(lambda: [m.set_attn_implementation(a) for m, a, _ in saved if m.config._attn_implementation != a])
    if _has_experts_switch(model):
        model.set_experts_implementation(NAME)
        undo.callback(lambda: [m.set_experts_implementation(e) for m, _, e in saved
                               if e is not None and m._can_set_experts_implementation()
                               and m.config._experts_implementation != e])
    unswitched = sorted({type(m).__name__ for m, _, _ in saved if m.config._attn_implementation != NAME})
    if unswitched:
        fall_back(f"{NAME} attention", f"transformers could not switch {', '.join(unswitched)} (its attention "
                                       "is not the registry's): batch-invariant through the aten overrides, "
                                       "not padding-invariant")
    undo.enter_context(kernelized_norms(model))
    return undo


@contextlib.contextmanager
def switched(model: torch.nn.Module) -> Iterator[None]:
    """`model` on detmoe's attention, experts and norms for the block; its own implementations back when the
    last block open on it closes (blocks of several threads on one model are counted)."""
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    register()
    with _lock:
        entry = _switched.setdefault(id(model), [0, None])
        if entry[0] == 0:
            try:
                entry[1] = _switch(model)
            except BaseException:
                del _switched[id(model)]
                raise
        entry[0] += 1
    try:
        yield
    finally:
        with _lock:
            entry[0] -= 1
            if entry[0] == 0:
                del _switched[id(model)]
                entry[1].close()
