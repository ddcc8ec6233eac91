"""Reference MoE layer and small MoE transformer with pluggable routers, for studying batch invariance.

Public API: MoEConfig, ModelConfig, MoELayer, MoETransformer, generate, build_router, Routing,
from_pretrained (local Hugging Face MoE checkpoints).
"""
from moe.cache import KVCache
from moe.config import COMBINES, PRESETS, ROUTERS, ModelConfig, MoEConfig
from moe.generate import generate
from moe.layer import MoELayer
from moe.model import MoETransformer, cu_seqlens_of
from moe.pretrained import from_pretrained, pretrained_config
from moe.routers import build_router
from moe.routing import ChunkState, Routing

__all__ = ["MoEConfig", "ModelConfig", "MoELayer", "MoETransformer", "generate", "build_router", "Routing",
           "ChunkState", "KVCache", "cu_seqlens_of", "ROUTERS", "COMBINES", "PRESETS",
           "from_pretrained", "pretrained_config"]
