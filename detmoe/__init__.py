"""detmoe: deterministic inference of Mixture-of-Experts transformers.

    import detmoe as dm
    model = dm.MoETransformer(dm.ModelConfig.from_name("tiny"))
    with dm.use_backend("batch_invariant"):
        tokens = dm.generate(model, prompts, max_new_tokens=16)   # the same bits in any batch

The parts, each a subpackage:
  detmoe.moe          the reference MoE model: layer, routers, engine, KV cache, parallel layouts, HF loading
  detmoe.kernels      the kernels behind one switch: "torch" (stock) or "batch_invariant" (ours, Triton)
  detmoe.diagnose     why a transformers MoE model answered differently: record two runs, compare them
  detmoe.invariant    `with detmoe.invariant_mode(model):` third-party model code on batch-invariant kernels
  detmoe.testing      pytest invariance checks for your own code (fixtures: detmoe/pytest_plugin.py)
  detmoe.lab          experiment plumbing: compositions, attribution, resumable cells, plots, reports
  detmoe.experiments  the apps (python -m detmoe.experiments.ablate, serve_sim, rl_consistency, train, ...)
  detmoe.configs      their Hydra YAML

Importing detmoe changes nothing outside it: no environment variable is set and triton is not imported
until the batch-invariant kernels are first used. Nor is torch: the names below are imported on first
access (PEP 562), because pytest imports this package at start-up in every project where it is installed
(the `detmoe` pytest plugin, detmoe/pytest_plugin.py) and that must stay cheap.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "kernels": "detmoe.kernels", "moe": "detmoe.moe",
    **dict.fromkeys(("invariant_mode", "InvariantModeWarning", "NotInvariantError"), "detmoe.invariant"),
    **dict.fromkeys(("available_backends", "get_backend", "use_backend"), "detmoe.kernels"),
    **dict.fromkeys(("DecodeGraphs", "KVCache", "Layout", "ModelConfig", "MoEConfig", "MoELayer", "MoETransformer",
                     "build_router", "cu_seqlens_of", "from_pretrained", "generate"), "detmoe.moe"),
}

__all__ = ["kernels", "moe", "invariant_mode", "InvariantModeWarning", "NotInvariantError", "use_backend", "get_backend", "available_backends", "MoETransformer", "MoELayer",
           "MoEConfig", "ModelConfig", "generate", "from_pretrained", "Layout", "KVCache", "DecodeGraphs",
           "build_router", "cu_seqlens_of", "__version__"]

if TYPE_CHECKING:   # what type checkers and IDEs see; at run time these come from __getattr__
    from detmoe import kernels, moe
    from detmoe.invariant import InvariantModeWarning, NotInvariantError, invariant_mode
    from detmoe.kernels import available_backends, get_backend, use_backend
    from detmoe.moe import (DecodeGraphs, KVCache, Layout, ModelConfig, MoEConfig, MoELayer, MoETransformer,
                            build_router, cu_seqlens_of, from_pretrained, generate)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'detmoe' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if _LAZY[name] == f"detmoe.{name}" else getattr(module, name)
    globals()[name] = value          # found once: later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
