"""Reference MoE layer and small MoE transformer with pluggable routers, for studying batch invariance.

Public API: MoEConfig, ModelConfig, MoELayer, MoETransformer, generate, build_router, Routing,
from_pretrained (local Hugging Face MoE checkpoints), Layout (tensor/expert parallelism over ranks),
DecodeGraphs (decode steps replayed as CUDA graphs).
"""
from detmoe.moe.cache import KVCache
from detmoe.moe.config import COMBINES, PRESETS, ModelConfig, MoEConfig
from detmoe.moe.generate import generate
from detmoe.moe.graphs import DecodeGraphs
from detmoe.moe.layer import MoELayer
from detmoe.moe.model import MoETransformer, cu_seqlens_of
from detmoe.moe.parallel import Layout
from detmoe.moe.pretrained import from_pretrained, pretrained_config
from detmoe.moe.routers import build_router, router_names
from detmoe.moe.routing import ChunkState, Routing

__all__ = ["MoEConfig", "ModelConfig", "MoELayer", "MoETransformer", "generate", "build_router", "Routing",
           "ChunkState", "KVCache", "cu_seqlens_of", "ROUTERS", "COMBINES", "PRESETS",
           "from_pretrained", "pretrained_config", "Layout", "DecodeGraphs"]


def __getattr__(name: str):
    # moe.ROUTERS: the registered routers' names, read from the registry on each access, so that a
    # router registered after `import moe` is listed too
    if name == "ROUTERS":
        return router_names()
    raise AttributeError(f"module 'moe' has no attribute {name!r}")
