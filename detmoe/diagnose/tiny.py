"""Tiny random `transformers` MoE models, built by transformers itself (its own config class and modelling
code, fresh weights per seed): the CPU default of `python -m detmoe.experiments.diagnose` (`model=tiny-mixtral`)
and the models the diagnosis is tested on.

    model = tiny_model("mixtral", seed=0)            # also qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss

Each architecture is set up to exercise what its real models do: GQA, odd widths, shared experts, grouped
routing, biases. transformers is imported when a model is built, not with this module (it is an optional
dependency of detmoe).
"""
from __future__ import annotations

from typing import Optional

import torch

COMMON = dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, pad_token_id=0, eos_token_id=None, bos_token_id=None)
# name -> (config class, its options): GQA, odd widths, shared experts, grouped routing, biases
ARCHS = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32, num_experts=6,
                                        num_experts_per_tok=2, shared_expert_intermediate_size=40)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                        num_experts_per_tok=3, head_dim=24)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                                            num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                                            kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                            v_head_dim=16, rope_scaling=None, num_key_value_heads=4)),
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                    layer_types=["full_attention"] * 3)),
}
MOE_LAYERS = {"deepseek_v3": [1, 2]}   # the others route in every layer


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ValueError("the tiny models are built by transformers, which is not installed: "
                         "pip install 'transformers>=5'") from e
    return transformers


def available_archs() -> list[str]:
    """The ARCHS this transformers has a config class for, in ARCHS' order."""
    transformers = _transformers()
    return [a for a, (cls, _) in ARCHS.items() if hasattr(transformers, cls)]


def tiny_model(arch: str, seed: int, dtype: torch.dtype = torch.float32, attn_implementation: Optional[str] = None,
               experts_implementation: Optional[str] = None):
    """A tiny `arch` model (an ARCHS name) in eval mode, its weights drawn from `seed`. The implementations:
    None for transformers' own default."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    transformers = _transformers()
    cls_name, opts = ARCHS[arch]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise ValueError(f"this transformers ({transformers.__version__}) has no {cls_name}: arch {arch!r} is "
                         f"not available here (available: {available_archs()})")
    torch.manual_seed(seed)
    cfg = cls(**{**COMMON, **opts})
    # only what is set: transformers' default is what a user gets from from_pretrained without the key
    impl = {k: v for k, v in dict(attn_implementation=attn_implementation,
                                  experts_implementation=experts_implementation).items() if v is not None}
    model = transformers.AutoModelForCausalLM.from_config(cfg, **impl).to(dtype).eval()
    with torch.no_grad():   # HF inits some weights to zeros or ones (router biases, norms): randomise them all
        for p in model.parameters():
            if p.dim() == 1 or (p.abs().sum() == 0):
                p.copy_(torch.randn_like(p) * 0.1 + (1 if p.dim() == 1 and (p == 1).all() else 0))
    return model
