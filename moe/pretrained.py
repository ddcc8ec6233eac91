"""Load a local Hugging Face MoE checkpoint folder (config.json + *.safetensors, sharded or not) into
`MoETransformer`: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE.

    model = moe.from_pretrained("/models/OLMoE-1B-7B-0924", dtype="bfloat16", device="cuda")
    model = moe.from_pretrained(path, router="capacity", capacity_factor=1.0)   # same weights, other router

Nothing is downloaded. Weights are read tensor by tensor with `safetensors.safe_open` into a model built
without memory (meta device, then `to_empty`), so the checkpoint never sits in memory twice. Each
architecture's math maps exactly onto ours:
- router: fp32 softmax over all experts -> top-k -> divide by the top-k sum (Mixtral always, the others
  if `norm_topk_prob`); HF breaks exact top-k ties with `torch.topk`, we give them to the lower index.
- Qwen2-MoE: q/k/v biases; a shared SwiGLU expert scaled by sigmoid(x @ w_shared_gate).
- OLMoE: RMSNorm on the whole q and k projections ("full" qk_norm); Qwen3-MoE: per head ("head").
HF stores Linear weights as [out, in]; ours are x @ W, so every matrix is transposed on the way in.
DeepSeek-V2/V3 (latent attention, grouped sigmoid routing with a selection bias) and any config
option we cannot reproduce exactly (sliding windows, dense layers, rope scaling) fail with ValueError.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from moe.config import DTYPES, ModelConfig, MoEConfig
from moe.model import Block, MoETransformer
from moe.parallel import Layout, shards_of

SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _read_config(path: Path) -> dict:
    if not (path / "config.json").is_file():
        raise ValueError(f"path={str(path)!r} must be a local model folder holding config.json")
    hf = json.loads((path / "config.json").read_text())
    arch = hf.get("model_type")
    if arch not in SUPPORTED:
        raise ValueError(f"unsupported architecture model_type={arch!r} in {path}; supported: {SUPPORTED} "
                         "(DeepSeek-V3-style latent attention and grouped sigmoid routing are not)")
    return hf


def _unsupported(hf: dict, what: str) -> ValueError:
    return ValueError(f"{hf['model_type']} checkpoint uses {what}, which MoETransformer does not model")


def _rope_theta(hf: dict) -> float:
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise _unsupported(hf, f"rope scaling {kind!r}")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def pretrained_config(path: str | Path, dtype: Optional[str] = None, **moe_overrides) -> ModelConfig:
    """The ModelConfig of a HF checkpoint folder. moe_overrides set MoEConfig fields (router, ...)."""
    path = Path(path)
    hf = _read_config(path)
    arch = hf["model_type"]
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported(hf, f"hidden_act={hf['hidden_act']!r} (experts here are SwiGLU)")
    if hf.get("use_sliding_window", arch == "mixtral") and hf.get("sliding_window"):
        raise _unsupported(hf, "sliding-window attention")
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise _unsupported(hf, "dense (non-MoE) layers (mlp_only_layers / decoder_sparse_step)")
    if hf.get("attention_bias") or hf.get("clip_qkv") is not None:
        raise _unsupported(hf, "attention_bias or clip_qkv")
    moe_kw = dict(n_experts=hf.get("num_local_experts", hf.get("num_experts")), top_k=hf["num_experts_per_tok"],
                  renormalize=True if arch == "mixtral" else bool(hf.get("norm_topk_prob", False)),
                  d_expert=hf["moe_intermediate_size"] if arch.startswith("qwen") else hf["intermediate_size"])
    if arch == "qwen2_moe":
        n_shared, rem = divmod(hf["shared_expert_intermediate_size"], moe_kw["d_expert"])
        if rem:
            raise _unsupported(hf, "a shared expert whose width is not a multiple of moe_intermediate_size")
        moe_kw.update(n_shared_experts=n_shared, shared_expert_gate=True)
    moe_kw.update(moe_overrides)
    if dtype is None:
        name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        dtype = name.removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        moe=MoEConfig(**moe_kw), rope_theta=_rope_theta(hf), norm_eps=hf["rms_norm_eps"],
        max_seq_len=hf.get("max_position_embeddings", 4096), dtype=dtype,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), attn_head_dim=hf.get("head_dim"),
        qkv_bias=arch == "qwen2_moe" and hf.get("qkv_bias", True),  # Qwen2-MoE: always biased before v5
        qk_norm={"olmoe": "full", "qwen3_moe": "head"}.get(arch))


class _SafetensorsFolder:
    """Tensor names -> lazy reads from the folder's safetensors files; records which names were read."""

    def __init__(self, path: Path, stack: contextlib.ExitStack):
        from safetensors import safe_open
        index = path / "model.safetensors.index.json"
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()}) \
            if index.is_file() else sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"path={str(path)!r} holds no *.safetensors files (convert .bin checkpoints first)")
        self.where, self.used = {}, set()
        for f in files:
            handle = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            self.where.update(dict.fromkeys(handle.keys(), handle))

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise ValueError(f"checkpoint lacks tensor {key!r}")
        self.used.add(key)
        return self.where[key].get_tensor(key)


def _load_block(block, ckpt: _SafetensorsFolder, i: int, cfg: ModelConfig) -> None:
    pre = f"model.layers.{i}."
    block.attn_norm.copy_(ckpt.get(pre + "input_layernorm.weight"))
    block.moe_norm.copy_(ckpt.get(pre + "post_attention_layernorm.weight"))
    attn = block.attn
    for n in "qkvo":
        getattr(attn, f"w{n}").copy_(ckpt.get(f"{pre}self_attn.{n}_proj.weight").t())   # [out, in] -> [in, out]
    if cfg.qkv_bias:
        for n in "qkv":
            getattr(attn, f"b{n}").copy_(ckpt.get(f"{pre}self_attn.{n}_proj.bias"))
    if cfg.qk_norm:
        attn.q_norm.copy_(ckpt.get(pre + "self_attn.q_norm.weight"))
        attn.k_norm.copy_(ckpt.get(pre + "self_attn.k_norm.weight"))
    mlp = pre + ("block_sparse_moe." if pre + "block_sparse_moe.gate.weight" in ckpt else "mlp.")
    layer, F = block.moe, cfg.moe.d_expert
    layer.w_router.copy_(ckpt.get(mlp + "gate.weight").t())                             # [E, D] -> [D, E]
    if mlp + "experts.gate_up_proj" in ckpt:   # transformers >= 5 fused layout: [E, 2F, D], [E, D, F]
        layer.w_gate_up.copy_(ckpt.get(mlp + "experts.gate_up_proj").transpose(1, 2))
        layer.w_down.copy_(ckpt.get(mlp + "experts.down_proj").transpose(1, 2))
    else:                                      # one Linear per expert (the layout on the Hub)
        mixtral = mlp + "experts.0.w1.weight" in ckpt
        gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        for e in range(cfg.moe.n_experts):
            x = f"{mlp}experts.{e}."
            layer.w_gate_up[e, :, :F].copy_(ckpt.get(f"{x}{gate}.weight").t())
            layer.w_gate_up[e, :, F:].copy_(ckpt.get(f"{x}{up}.weight").t())
            layer.w_down[e].copy_(ckpt.get(f"{x}{down}.weight").t())
    if cfg.moe.n_shared_experts:
        Fs = cfg.moe.n_shared_experts * F
        layer.w_shared_gate_up[:, :Fs].copy_(ckpt.get(mlp + "shared_expert.gate_proj.weight").t())
        layer.w_shared_gate_up[:, Fs:].copy_(ckpt.get(mlp + "shared_expert.up_proj.weight").t())
        layer.w_shared_down.copy_(ckpt.get(mlp + "shared_expert.down_proj.weight").t())
        layer.w_shared_gate.copy_(ckpt.get(mlp + "shared_expert_gate.weight").t())      # [1, D] -> [D, 1]


def _empty_block(cfg: ModelConfig, i: int) -> Block:
    """Layer i of the layout-free model, allocated on the CPU without values."""
    with torch.device("meta"):
        block = Block(cfg, i, cfg.torch_dtype)
    return block.to_empty(device="cpu")


@torch.no_grad()
def from_pretrained(path: str | Path, dtype: Optional[str | torch.dtype] = None,
                    device: Optional[torch.device | str] = None, layout: Optional[Layout] = None,
                    reduce_chunks: int = 4, **moe_overrides) -> MoETransformer:
    """A MoETransformer with the weights of a local HF checkpoint folder, in `dtype` (default: the
    checkpoint's) on `device` (default: cpu). moe_overrides set MoEConfig fields, e.g. router="capacity".

    reduce_chunks: the K chunks of the row-parallel sums (a multiple of the layout's ranks; ModelConfig).
    With a layout (moe/parallel.py) each rank keeps its shard: a layer is read whole into CPU memory (one
    layer at a time), and each rank copies its part to the device."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype}")
        dtype = _DTYPE_NAMES[dtype]
    path = Path(path)
    cfg = dataclasses.replace(pretrained_config(path, dtype, **moe_overrides), reduce_chunks=reduce_chunks)
    model = MoETransformer(cfg, device="meta", layout=layout).to_empty(device=device or "cpu")  # no values yet
    shards = shards_of(model)
    with contextlib.ExitStack() as stack:
        ckpt = _SafetensorsFolder(path, stack)
        model.embed.copy_(ckpt.get("model.embed_tokens.weight"))
        for i, block in enumerate(model.blocks):
            if layout is None:
                _load_block(block, ckpt, i, cfg)
                continue
            whole = _empty_block(cfg, i)                                     # one layer, layout-free
            _load_block(whole, ckpt, i, cfg)
            for name, p in block.named_parameters():
                shard = shards.get(f"blocks.{i}.{name}")
                full = whole.get_parameter(name)
                p.copy_(full if shard is None else shard.take(full))
        model.final_norm.copy_(ckpt.get("model.norm.weight"))
        if model.lm_head is not None:
            model.lm_head.copy_(ckpt.get("lm_head.weight").t())                          # [V, D] -> [D, V]
        elif "lm_head.weight" in ckpt:
            ckpt.used.add("lm_head.weight")  # tied: a stored copy of the embedding
        left = sorted(k for k in ckpt.where if k not in ckpt.used and "rotary_emb" not in k)
        if left:  # a weight we do not read would silently change the model
            raise ValueError(f"checkpoint holds {len(left)} tensors this loader does not map, e.g. {left[:3]}")
    return model
