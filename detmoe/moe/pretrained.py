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
import itertools
import json
from pathlib import Path
from typing import Optional

import torch

from detmoe.moe.config import DTYPES, ModelConfig, MoEConfig
from detmoe.moe.model import MoETransformer
from detmoe.moe.parallel import Layout, Shard, shards_of

SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise ValueError(f"path={str(path)!r} must be a local model folder holding config.json")
    try:
        hf = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(hf, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(hf).__name__}")
    arch = hf.get("model_type")
    if arch not in SUPPORTED:
        raise ValueError(f"unsupported architecture model_type={arch!r} in {path}; supported: {SUPPORTED} "
                         "(DeepSeek-V3-style latent attention and grouped sigmoid routing are not)")
    return hf


def _field(hf: dict, path: Path, *names: str):
    """The value of the first of `names` that config.json sets (HF renames fields across architectures)."""
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    alias = f" (or {', '.join(map(repr, names[1:]))})" if len(names) > 1 else ""
    raise ValueError(f"{path / 'config.json'} lacks the field {names[0]!r}{alias}, which a "
                     f"{hf['model_type']} checkpoint needs")


def _flag(hf: dict, name: str, default: bool):
    """A boolean field, unset or null meaning `default`; any other non-bool goes on to ModelConfig's check
    (bool() would read the string "false" as true)."""
    value = hf.get(name)
    return default if value is None else value


def _unsupported(hf: dict, what: str) -> ValueError:
    return ValueError(f"{hf['model_type']} checkpoint uses {what}, which MoETransformer does not model")


def _rope_theta(hf: dict) -> float:
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise _unsupported(hf, f"rope scaling {kind!r}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    # anything but a number (null, a string) goes on to ModelConfig's check, which names it
    return float(theta) if isinstance(theta, (int, float)) and not isinstance(theta, bool) else theta


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
    need = lambda *names: _field(hf, path, *names)
    moe_kw = dict(n_experts=need("num_local_experts", "num_experts"), top_k=need("num_experts_per_tok"),
                  renormalize=True if arch == "mixtral" else _flag(hf, "norm_topk_prob", False),
                  d_expert=need("moe_intermediate_size") if arch.startswith("qwen") else need("intermediate_size"))
    if arch == "qwen2_moe":
        Fs, F = need("shared_expert_intermediate_size"), moe_kw["d_expert"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (Fs, F)) or Fs < 0 or F < 1:
            raise ValueError(f"{path / 'config.json'}: shared_expert_intermediate_size={Fs!r} must be an int >= 0 "
                             f"and moe_intermediate_size={F!r} an int >= 1")
        n_shared, rem = divmod(Fs, F)
        if rem:
            raise _unsupported(hf, "a shared expert whose width is not a multiple of moe_intermediate_size")
        # no shared expert, no gate: its stored weights then fail as unmapped tensors
        moe_kw.update(n_shared_experts=n_shared, shared_expert_gate=n_shared > 0)
    dims = dict(vocab_size=need("vocab_size"), d_model=need("hidden_size"), n_layers=need("num_hidden_layers"),
                n_heads=need("num_attention_heads"), norm_eps=need("rms_norm_eps"), rope_theta=_rope_theta(hf))
    moe_kw.update(moe_overrides)
    if dtype is None:
        name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        dtype = name.removeprefix("torch.") if isinstance(name, str) else name
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    try:  # a value config.json gives of the wrong type or range is named by the config's own checks
        return ModelConfig(
            **dims, n_kv_heads=hf.get("num_key_value_heads") or dims["n_heads"],
            moe=MoEConfig(**moe_kw),
            max_seq_len=hf.get("max_position_embeddings", 4096), dtype=dtype,
            tie_embeddings=_flag(hf, "tie_word_embeddings", False), attn_head_dim=hf.get("head_dim"),
            qkv_bias=arch == "qwen2_moe" and _flag(hf, "qkv_bias", True),  # Qwen2-MoE: always biased before v5
            qk_norm={"olmoe": "full", "qwen3_moe": "head"}.get(arch))
    except ValueError as e:
        given = f" with overrides {moe_overrides}" if moe_overrides else ""
        raise ValueError(f"the config of {path / 'config.json'}{given} is invalid: {e}") from e


class _SafetensorsFolder:
    """Tensor names -> lazy reads from the folder's safetensors files; records which names were read."""

    def __init__(self, path: Path, stack: contextlib.ExitStack):
        from safetensors import SafetensorError, safe_open
        index = path / "model.safetensors.index.json"
        try:
            files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()}) \
                if index.is_file() else sorted(path.glob("*.safetensors"))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} must be JSON with a 'weight_map' of tensor names to files: {e!r}") from e
        if not files:
            raise ValueError(f"path={str(path)!r} holds no *.safetensors files (convert .bin checkpoints first)")
        self.where, self.file, self.used = {}, {}, set()
        for f in files:
            try:  # safe_open checks the header against the file's length: a truncated file fails here
                handle = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{f.name} in {path} is not a readable safetensors file (truncated, corrupt "
                                 f"or missing?): {e}") from e
            self.where.update(dict.fromkeys(handle.keys(), handle))
            self.file.update(dict.fromkeys(handle.keys(), f.name))

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def check_shape(self, key: str, expected: tuple[int, ...]) -> None:
        """A tensor of another shape must not reach `copy_`, which would broadcast a [1, D] or [] one."""
        if key not in self.where:
            raise ValueError(f"checkpoint lacks tensor {key!r}")
        got = tuple(self.where[key].get_slice(key).get_shape())  # from the header: nothing read
        if got != tuple(expected):
            raise ValueError(f"{key} in {self.file[key]} has shape {got}, expected {tuple(expected)} "
                             "(from config.json)")

    def get(self, key: str, expected: tuple[int, ...], part: Optional[tuple] = None) -> torch.Tensor:
        """The tensor, after checking it has the shape `expected`, or only its `part` (a tuple of slices:
        read from the file without the rest)."""
        self.check_shape(key, expected)
        self.used.add(key)
        return self.where[key].get_tensor(key) if part is None else self.where[key].get_slice(key)[part]


@dataclasses.dataclass(frozen=True)
class _Entry:
    """Checkpoint tensor `key` (transposed in its last two dims if `transpose`: HF stores [out, in]) is
    block parameter `param` at `index` (ints and slices, in the layout-free model's coordinates)."""
    param: str
    index: tuple
    key: str
    transpose: bool


def _block_entries(ckpt: _SafetensorsFolder, i: int, cfg: ModelConfig) -> list[_Entry]:
    """Where every tensor of layer i goes."""
    pre, every = f"model.layers.{i}.", ()
    out = [_Entry("attn_norm", every, pre + "input_layernorm.weight", False),
           _Entry("moe_norm", every, pre + "post_attention_layernorm.weight", False)]
    out += [_Entry(f"attn.w{n}", every, f"{pre}self_attn.{n}_proj.weight", True) for n in "qkvo"]
    if cfg.qkv_bias:
        out += [_Entry(f"attn.b{n}", every, f"{pre}self_attn.{n}_proj.bias", False) for n in "qkv"]
    if cfg.qk_norm:
        out += [_Entry(f"attn.{n}_norm", every, f"{pre}self_attn.{n}_norm.weight", False) for n in "qk"]
    mlp = pre + ("block_sparse_moe." if pre + "block_sparse_moe.gate.weight" in ckpt else "mlp.")
    F = cfg.moe.d_expert
    out.append(_Entry("moe.w_router", every, mlp + "gate.weight", True))                # [E, D] -> [D, E]
    if mlp + "experts.gate_up_proj" in ckpt:   # transformers >= 5 fused layout: [E, 2F, D], [E, D, F]
        out += [_Entry("moe.w_gate_up", every, mlp + "experts.gate_up_proj", True),
                _Entry("moe.w_down", every, mlp + "experts.down_proj", True)]
    else:                                      # one Linear per expert (the layout on the Hub)
        mixtral = mlp + "experts.0.w1.weight" in ckpt
        gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        for e in range(cfg.moe.n_experts):
            x = f"{mlp}experts.{e}."
            out += [_Entry("moe.w_gate_up", (e, slice(None), slice(0, F)), f"{x}{gate}.weight", True),
                    _Entry("moe.w_gate_up", (e, slice(None), slice(F, 2 * F)), f"{x}{up}.weight", True),
                    _Entry("moe.w_down", (e,), f"{x}{down}.weight", True)]
    if cfg.moe.n_shared_experts:
        Fs = cfg.moe.n_shared_experts * F
        out += [_Entry("moe.w_shared_gate_up", (slice(None), slice(0, Fs)), mlp + "shared_expert.gate_proj.weight", True),
                _Entry("moe.w_shared_gate_up", (slice(None), slice(Fs, 2 * Fs)), mlp + "shared_expert.up_proj.weight", True),
                _Entry("moe.w_shared_down", every, mlp + "shared_expert.down_proj.weight", True),
                _Entry("moe.w_shared_gate", every, mlp + "shared_expert_gate.weight", True)]  # [1, D] -> [D, 1]
    return out


def _transposed(shape: tuple[int, ...], transpose: bool) -> tuple[int, ...]:
    return (*shape[:-2], shape[-1], shape[-2]) if transpose else tuple(shape)


def _read(ckpt: _SafetensorsFolder, entry: _Entry, expected: tuple[int, ...],
          part: Optional[list] = None) -> torch.Tensor:
    """The entry's tensor in our orientation; `expected`: its whole shape in the file's orientation;
    `part`: slices in our orientation, read alone."""
    if part is not None and entry.transpose:
        part = part[:-2] + [part[-1], part[-2]]
    t = ckpt.get(entry.key, expected, None if part is None else tuple(part))
    return t.transpose(-1, -2) if entry.transpose else t


def _load_block(block, ckpt: _SafetensorsFolder, i: int, cfg: ModelConfig, shards: dict[str, Shard]) -> None:
    """Layer i's tensors into `block`; a sharded parameter (`shards`, by name in the block) takes only
    its rank's part, and only that part is read from the files (an EP rank skips other ranks' experts)."""
    for entry in _block_entries(ckpt, i, cfg):
        param, shard = block.get_parameter(entry.param), shards.get(entry.param)
        # the layout-free parameter's shape at entry.index (on meta: no memory), in the file's orientation;
        # checked on every rank, also where another rank holds all of the tensor
        full = param.shape if shard is None else shard.full_shape(param.shape)
        expected = _transposed(torch.empty(full, device="meta")[entry.index].shape, entry.transpose)
        ckpt.check_shape(entry.key, expected)
        if shard is None:
            param[entry.index].copy_(_read(ckpt, entry, expected))
            continue
        ckpt.used.add(entry.key)  # mapped, even where another rank holds all of it
        for local, part in _rank_parts(entry.index, param.shape, shard):
            param[local].copy_(_read(ckpt, entry, expected, part))


def _rank_parts(index: tuple, local_shape: torch.Size, shard: Shard):
    """For a tensor placed at `index` of a full parameter, the (local index, slices of the tensor or None
    for all of it) pairs that fall in this rank's shard (none if it holds none of it). A shard split
    along several dims gives every combination of its splits' pieces."""
    idx = list(index) + [slice(None)] * (len(local_shape) - len(index))
    tensor_ndim = sum(1 for x in idx if not isinstance(x, int))
    splits = shard.splits
    for pieces in itertools.product(*(_split_pieces(idx, s, local_shape[s.dim]) for s in splits)):
        local, part = list(idx), [slice(None)] * tensor_ndim
        for s, (local_d, tensor_slice) in zip(splits, pieces):
            local[s.dim] = local_d
            if tensor_slice is not None:
                part[sum(1 for x in idx[:s.dim] if not isinstance(x, int))] = tensor_slice  # s.dim's axis
        sliced = any(p != slice(None) for p in part)
        yield tuple(local), part if sliced else None


def _split_pieces(idx: list, split: Shard, local_len: int):
    """Along one split's dim (idx[dim]: an int or a slice of the full parameter): the (local index on that
    dim, slice of the tensor's axis or None for an int) pairs in this rank's block."""
    d = split.dim
    piece = local_len // split.parts                                       # this rank's length per part
    part_len = piece * split.size
    if isinstance(idx[d], int):                                            # one row of the sharded axis
        lo = split.rank * piece
        if lo <= idx[d] < lo + piece:
            yield idx[d] - lo, None
        return
    a = idx[d].start or 0
    b = idx[d].stop if idx[d].stop is not None else part_len * split.parts
    for q in range(split.parts):
        lo = q * part_len + split.rank * piece
        s, e = max(a, lo), min(b, lo + piece)
        if s < e:
            yield slice(q * piece + s - lo, q * piece + e - lo), slice(s - a, e - a)


@torch.no_grad()
def from_pretrained(path: str | Path, dtype: Optional[str | torch.dtype] = None,
                    device: Optional[torch.device | str] = None, layout: Optional[Layout] = None,
                    reduce_chunks: int = 4, **moe_overrides) -> MoETransformer:
    """A MoETransformer with the weights of a local HF checkpoint folder, in `dtype` (default: the
    checkpoint's) on `device` (default: cpu). moe_overrides set MoEConfig fields, e.g. router="capacity".

    reduce_chunks: the K chunks of the row-parallel sums (a multiple of the layout's ranks; ModelConfig).
    With a layout (detmoe/moe/parallel.py) each rank reads only its part of each sharded tensor from the files
    (safetensors slices; an expert-parallel rank skips the other ranks' experts) and the replicated ones."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype}")
        dtype = _DTYPE_NAMES[dtype]
    path = Path(path)
    cfg = dataclasses.replace(pretrained_config(path, dtype, **moe_overrides), reduce_chunks=reduce_chunks)
    model = MoETransformer(cfg, device="meta", layout=layout).to_empty(device=device or "cpu")  # no values yet
    with contextlib.ExitStack() as stack:
        ckpt = _SafetensorsFolder(path, stack)
        V, D = cfg.vocab_size, cfg.d_model
        model.embed.copy_(ckpt.get("model.embed_tokens.weight", (V, D)))
        for i, block in enumerate(model.blocks):
            _load_block(block, ckpt, i, cfg, shards_of(block))
        model.final_norm.copy_(ckpt.get("model.norm.weight", (D,)))
        if model.lm_head is not None:
            model.lm_head.copy_(ckpt.get("lm_head.weight", (V, D)).t())                  # [V, D] -> [D, V]
        elif "lm_head.weight" in ckpt:
            ckpt.check_shape("lm_head.weight", (V, D))  # tied: a stored copy of the embedding
            ckpt.used.add("lm_head.weight")
        left = sorted(k for k in ckpt.where if k not in ckpt.used and "rotary_emb" not in k)
        if left:  # a weight we do not read would silently change the model
            raise ValueError(f"checkpoint holds {len(left)} tensors this loader does not map, e.g. {left[:3]}")
    return model
