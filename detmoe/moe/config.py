"""Model and MoE configuration: validated dataclasses, mirrored by `detmoe/configs/model/*.yaml`.

Bad values fail early with a `ValueError` that names the field and what is allowed.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch

COMBINES = ("ordered", "scatter_add")
QK_NORMS = ("full", "head")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_fields(cls: type, kw: Mapping, name: str) -> None:
    """`kw` (keyword arguments for dataclass `cls`, e.g. from Hydra or JSON) names only `cls`'s fields and
    all its required ones, else a ValueError naming them: the dataclass's own TypeError would not."""
    _check(isinstance(kw, Mapping), f"{name} must be a mapping of {cls.__name__} fields, got {kw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(kw) - set(fields)))
    _check(not unknown, f"{name} has unknown fields {unknown}; allowed: {tuple(fields)}")
    missing = [n for n, f in fields.items() if n not in kw
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    _check(not missing, f"{name} lacks the required fields {missing}")


def check_reduce_chunks(chunks: int, **widths: int) -> None:
    """reduce_chunks must be a power of two dividing every K it cuts (the row-parallel matmuls sum K in
    that many equal chunks: detmoe/moe/parallel.py); `widths` names those Ks."""
    # bool is an int subclass: True would pass as one chunk
    _check(isinstance(chunks, int) and not isinstance(chunks, bool) and chunks >= 1 and chunks & (chunks - 1) == 0,
           f"reduce_chunks must be a power of two >= 1, got {chunks!r}")
    for name, K in widths.items():
        _check(K % chunks == 0, f"{name}={K} must be divisible by reduce_chunks={chunks} (the row-parallel "
                                "matmuls sum K in that many equal chunks)")


@dataclass(frozen=True)  # read at forward time: fixed once a module is built from it
class MoEConfig:
    n_experts: int
    top_k: int
    d_expert: int                      # hidden size of each SwiGLU expert
    n_shared_experts: int = 0          # dense SwiGLU experts every token goes through (Qwen2-MoE, DeepSeek)
    router: str = "topk"               # a registered router's name, one of moe.ROUTERS
    capacity_factor: float = 1.25      # capacity routers: slots per expert = ceil(cf * tokens * top_k / E)
    combine: str = "ordered"           # one of COMBINES
    renormalize: bool = True           # divide the top-k weights by their sum (Mixtral, norm_topk_prob)
    drop_order: str = "position"       # capacity router: who keeps a slot (see routers/capacity.py)
    group_size: int = 64               # sequence_capacity: tokens per fixed chunk of one sequence
    min_capacity: int = 0              # lower bound on slots per expert (DeepSpeed uses 8)
    shared_expert_gate: bool = False   # scale shared experts by sigmoid(x @ w) (Qwen2-MoE)

    def __post_init__(self) -> None:
        # n_experts, top_k, router and the router options follow the router classes' own rules: every
        # registered router is built from this config (the chosen one first), so an option the chosen
        # router ignores is still checked, and a typo in it is an error rather than a silent default
        # (moe.routers imports this module)
        from detmoe.moe.routers import (check_bool, check_choice, check_int, router_from_config,
                                        router_names)
        check_choice("router", self.router, router_names())
        for name in dict.fromkeys((self.router, *router_names())):
            router_from_config(self, name)
        check_int("d_expert", self.d_expert, 1)
        check_int("n_shared_experts", self.n_shared_experts, 0)
        check_choice("combine", self.combine, COMBINES)
        check_bool("shared_expert_gate", self.shared_expert_gate)
        _check(not self.shared_expert_gate or self.n_shared_experts >= 1,
               "shared_expert_gate=True needs n_shared_experts >= 1 (it scales the shared experts)")


@dataclass(frozen=True)  # read at forward time: fixed once a module is built from it
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    moe: MoEConfig
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    max_seq_len: int = 2048            # KV-cache length per sequence
    dtype: str = "float32"             # parameter and activation dtype, one of DTYPES
    tie_embeddings: bool = False
    init_std: float = 0.02
    seed: int = 0                      # weights are a function of the config: same seed, same model
    # Options of real checkpoints (moe.from_pretrained); the defaults leave the model as it was.
    attn_head_dim: Optional[int] = None  # per-head width when not d_model / n_heads (Qwen3-MoE)
    qkv_bias: bool = False             # biases on the q/k/v projections (Qwen2-MoE)
    qk_norm: Optional[str] = None      # RMSNorm on q, k before RoPE: "full" projection (OLMoE), "head" (Qwen3)
    # batch_invariant backend: the row-parallel matmuls (attention output, expert and shared-expert down
    # projections) sum K as a balanced tree of this many equal chunks, so that any tensor-parallel size
    # dividing it gives the same bits (detmoe/moe/parallel.py). A power of two.
    reduce_chunks: int = 4

    def __post_init__(self) -> None:
        # Every field is checked for its type too: Hydra hands over `+model.tie_embeddings=no` as the
        # string "no" (truthy), YAML `d_model: 64.0` as a float, `norm_eps=nan` as NaN (every logit NaN).
        from detmoe.moe.routers import check_bool, check_int, check_positive
        if isinstance(self.moe, Mapping):  # from Hydra/YAML
            check_fields(MoEConfig, self.moe, "moe")
            object.__setattr__(self, "moe", MoEConfig(**self.moe))  # frozen: the one set-up write
        _check(isinstance(self.moe, MoEConfig), f"moe must be a MoEConfig or a dict of its fields, got {self.moe!r}")
        check_int("vocab_size", self.vocab_size, 2)
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            check_int(name, getattr(self, name), 1)
        if self.attn_head_dim is not None:
            check_int("attn_head_dim", self.attn_head_dim, 1)
        _check(self.attn_head_dim is not None or self.d_model % self.n_heads == 0,
               f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        _check(self.head_dim % 2 == 0, f"head dim must be even for RoPE, got {self.head_dim}")
        _check(self.n_heads % self.n_kv_heads == 0,
               f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            check_positive(name, getattr(self, name))
        _check(isinstance(self.dtype, str) and self.dtype in DTYPES,
               f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        check_bool("tie_embeddings", self.tie_embeddings)
        check_bool("qkv_bias", self.qkv_bias)
        # the range torch.Generator.manual_seed takes, kept non-negative
        check_int("seed", self.seed, 0, 2**64 - 1)
        _check(self.qk_norm is None or (isinstance(self.qk_norm, str) and self.qk_norm in QK_NORMS),
               f"qk_norm must be None or one of {QK_NORMS}, got {self.qk_norm!r}")
        check_reduce_chunks(self.reduce_chunks, attention_width=self.n_heads * self.head_dim,
                            d_expert=self.moe.d_expert)

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.d_model // self.n_heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_dict(cls, kw: Mapping[str, Any]) -> "ModelConfig":
        """From plain data (Hydra, JSON): `moe` a dict of MoEConfig fields. An unknown or missing field is a
        ValueError naming it."""
        check_fields(cls, kw, "model config")
        return cls(**kw)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        """A named preset (see PRESETS), with fields overridden by keyword (`moe`: a dict of MoEConfig fields)."""
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
        kw = dict(PRESETS[name])
        moe_kw = dict(kw.pop("moe"))
        moe_over = overrides.pop("moe", {})
        _check(isinstance(moe_over, Mapping), f"moe overrides must be a dict of MoEConfig fields, got {moe_over!r}")
        moe_kw.update(moe_over)
        kw.update(overrides)
        return cls.from_dict({**kw, "moe": moe_kw})


# Named presets; detmoe/configs/model/*.yaml mirror them.
PRESETS: dict[str, dict] = {
    # CPU-sized: fast enough for tests and the default ablation on 2 cores.
    "tiny": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256,
                 moe=dict(n_experts=8, top_k=2, d_expert=64)),
    "small": dict(vocab_size=512, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=1024,
                  moe=dict(n_experts=16, top_k=4, d_expert=128, n_shared_experts=1)),
    # Trained on the Python stdlib's bytes by detmoe/experiments/train.py; weights in detmoe/moe/checkpoints/.
    "trained": dict(vocab_size=256, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256,
                    moe=dict(n_experts=8, top_k=2, d_expert=64)),
    # Shaped like a production MoE layer (OLMoE/Qwen3-MoE class), for the GPU.
    "large": dict(vocab_size=32768, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=4,
                  max_seq_len=8192, dtype="bfloat16",
                  moe=dict(n_experts=64, top_k=8, d_expert=768)),
    # Mixtral-8x7B's layer shapes (d_model 4096, 8 experts top-2, d_expert 14336, 32/8 heads) with 8
    # layers instead of 32, so it fits one H100 (about 12 B parameters, 24 GB in bf16) and runs fast.
    # It exists for its contraction sizes: stock bf16 cuBLAS was batch-variant on the H100 only for
    # K >= 4096 (`large` has K <= 2048 and its stock kernels were invariant in serve_sim), so this is
    # the preset on which the stock backend can show arithmetic divergence at all.
    "wide": dict(vocab_size=32768, d_model=4096, n_layers=8, n_heads=32, n_kv_heads=8,
                 max_seq_len=8192, dtype="bfloat16",
                 moe=dict(n_experts=8, top_k=2, d_expert=14336)),
    # Qwen2-MoE's (Qwen1.5-MoE-A2.7B's) expert widths: 60 experts top-4 of d_expert 1408, a gated shared
    # SwiGLU of 4 x 1408 = 5632, 16 heads, in 8 layers: the checkpoint widths the parallel layouts split
    # (60 experts over 2 or 4 ranks, 1408 and 5632 over TP partners).
    "qwen2_moe": dict(vocab_size=32768, d_model=2048, n_layers=8, n_heads=16, n_kv_heads=16,
                      max_seq_len=8192, dtype="bfloat16",
                      moe=dict(n_experts=60, top_k=4, d_expert=1408, n_shared_experts=4, shared_expert_gate=True)),
}
