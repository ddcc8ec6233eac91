"""Batch invariance for third-party PyTorch model code: `with detmoe.invariant_mode(): ...`.

    import detmoe
    with detmoe.invariant_mode(model):       # a transformers MoE model, run with its own code
        out = model.generate(**batch)        # each request: the same bits alone or in any batch

mode.py (the context manager), aten_ops.py (the torch.library overrides), attention.py (padding-invariant
attention), transformers_hooks.py (transformers' attention and experts registries), fallback.py (what a
call the mode cannot run does). docs/invariant_mode.md says which mechanism covers what.
"""
from detmoe.invariant.fallback import InvariantModeWarning, NotInvariantError
from detmoe.invariant.mode import active, invariant_mode

__all__ = ["invariant_mode", "active", "InvariantModeWarning", "NotInvariantError"]
