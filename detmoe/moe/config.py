"""Model and MoE configuration: validated dataclasses, mirrored by `detmoe/configs/model/*.yaml`.

Bad values fail early with a `ValueError` that names the field and what is allowed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

COMBINES = ("ordered", "scatter_add")
QK_NORMS = ("full", "head")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_reduce_chunks(chunks: int, **widths: int) -> None:
    """reduce_chunks must be a power of two dividing every K it cuts (the row-parallel matmuls sum K in
    that many equal chunks: detmoe/moe/parallel.py); `widths` names those Ks."""
    _check(isinstance(chunks, int) and chunks >= 1 and chunks & (chunks - 1) == 0,
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
        from detmoe.moe.routers import router_from_config, router_names  # (moe.routers imports this module)
        _check(self.router in router_names(), f"router must be one of {router_names()}, got {self.router!r}")
        for name in dict.fromkeys((self.router, *router_names())):
            router_from_config(self, name)
        _check(self.d_expert >= 1, f"d_expert must be >= 1, got {self.d_expert}")
        _check(self.n_shared_experts >= 0, f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        _check(self.combine in COMBINES, f"combine must be one of {COMBINES}, got {self.combine!r}")


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
        if isinstance(self.moe, dict):  # from Hydra/YAML
            object.__setattr__(self, "moe", MoEConfig(**self.moe))  # frozen: the one set-up write
        _check(self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")
        _check(self.n_layers >= 1, f"n_layers must be >= 1, got {self.n_layers}")
        _check(self.attn_head_dim is None or self.attn_head_dim >= 1,
               f"attn_head_dim must be None or >= 1, got {self.attn_head_dim}")
        _check(self.n_heads >= 1 and (self.attn_head_dim is not None or self.d_model % self.n_heads == 0),
               f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        _check(self.head_dim % 2 == 0, f"head dim must be even for RoPE, got {self.head_dim}")
        _check(self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0,
               f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        _check(self.max_seq_len >= 1, f"max_seq_len must be >= 1, got {self.max_seq_len}")
        _check(self.dtype in DTYPES, f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        _check(self.qk_norm is None or self.qk_norm in QK_NORMS,
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
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        """A named preset (see PRESETS), with fields overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
        kw = dict(PRESETS[name])
        moe_kw = dict(kw.pop("moe"))
        moe_kw.update(overrides.pop("moe", {}))
        kw.update(overrides)
        return cls(moe=MoEConfig(**moe_kw), **kw)


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
}
