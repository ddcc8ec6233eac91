"""detmoe: deterministic inference of Mixture-of-Experts transformers.

    import detmoe as dm
    model = dm.MoETransformer(dm.ModelConfig.from_name("tiny"))
    with dm.use_backend("batch_invariant"):
        tokens = dm.generate(model, prompts, max_new_tokens=16)   # the same bits in any batch

The parts, each a subpackage:
  detmoe.moe          the reference MoE model: layer, routers, engine, KV cache, parallel layouts, HF loading
  detmoe.kernels      the kernels behind one switch: "torch" (stock) or "batch_invariant" (ours, Triton)
  detmoe.lab          experiment plumbing: compositions, attribution, resumable cells, plots, reports
  detmoe.experiments  the apps (python -m detmoe.experiments.ablate, serve_sim, rl_consistency, train, ...)
  detmoe.configs      their Hydra YAML

Importing detmoe changes nothing outside it: no environment variable is set and triton is not imported
until the batch-invariant kernels are first used.
"""
from detmoe import kernels, moe
from detmoe.kernels import available_backends, get_backend, use_backend
from detmoe.moe import (DecodeGraphs, KVCache, Layout, ModelConfig, MoEConfig, MoELayer, MoETransformer,
                        build_router, cu_seqlens_of, from_pretrained, generate)

__version__ = "0.1.0"

__all__ = ["kernels", "moe", "use_backend", "get_backend", "available_backends", "MoETransformer", "MoELayer",
           "MoEConfig", "ModelConfig", "generate", "from_pretrained", "Layout", "KVCache", "DecodeGraphs",
           "build_router", "cu_seqlens_of", "__version__"]
