"""`invariant_mode()`: run third-party PyTorch model code on batch-invariant kernels inside a `with` block.

    with detmoe.invariant_mode():                 # aten overrides (detmoe/invariant/aten_ops.py)
        out = model.generate(**batch)
    with detmoe.invariant_mode(model):            # also the model's attention, experts and norms through
        out = model.generate(**batch)             # transformers' registries (transformers_hooks.py)

Entering registers the overrides with `torch.library` for the CPU and CUDA dispatch keys, and runs
`torch.compile`d functions eagerly (compiled code would bypass the dispatcher); leaving the outermost block
undoes both, so PyTorch's own kernels are back, also when the block raises. Blocks nest.

Threads: PyTorch's dispatcher is process-wide, so while any thread is inside a block every thread's calls
of the overridden operators run on the overrides (and `strict` holds for all while any strict block is
open). Entering and leaving are locked and counted, so threads may enter and leave concurrently: the
overrides go when the last block closes. Under Triton's interpreter (CPU) the kernels run one at a time
(detmoe/kernels/runtime.py). A model passed to the mode is switched for the block's duration: do not run
that model from another thread with other settings meanwhile.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Iterator, Optional

import torch

from detmoe.invariant import fallback

_lock = threading.Lock()
_entries = 0
_strict_entries = 0
_library: Optional[torch.library.Library] = None
_stance = None   # torch.compiler.set_stance("force_eager") while a block is open


def _register() -> torch.library.Library:
    from detmoe.invariant.aten_ops import OVERRIDES
    from detmoe.kernels import runtime
    runtime.prepare()    # the interpreter on a machine without CUDA, before any kernel is built
    library = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        # PyTorch warns once that a kernel is overridden: that is the point of the mode
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
        warnings.filterwarnings("ignore", message=".*Warning only once for all operators.*")
        for name, keys, impl in OVERRIDES:
            for key in keys:
                library.impl(name, impl, key)
    return library


def active() -> bool:
    """True while some thread is inside `invariant_mode()`."""
    return _entries > 0


@contextlib.contextmanager
def invariant_mode(model: Optional[torch.nn.Module] = None, *, strict: bool = False) -> Iterator[None]:
    """Run the enclosed PyTorch code on detmoe's batch-invariant kernels: a request's outputs get the same
    bits alone or in any batch, at any padding.

    model: a `transformers` model to switch, for the block, to detmoe's attention, experts and norms
        through transformers' own registries (its previous implementations come back on exit). Without it
        the aten overrides alone apply, which cover transformers' sdpa attention and grouped experts too.
    strict: raise `NotInvariantError` instead of warning where a call falls back to a PyTorch kernel.
    """
    global _entries, _strict_entries, _library, _stance
    if not isinstance(strict, bool):
        raise ValueError(f"strict must be True or False, got {strict!r}")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    with _lock:
        if _entries == 0:
            _library = _register()
            # compiled code (torch.compile; transformers compiles a static cache's decode step itself) runs
            # kernels of its own, past the dispatcher: inside the mode, compiled functions run eagerly
            _stance = torch.compiler.set_stance("force_eager")
        _entries += 1
        _strict_entries += strict
        fallback.set_strict_entries(_strict_entries)
    try:
        if model is None:
            yield
        else:
            from detmoe.invariant.transformers_hooks import switched
            with switched(model):
                yield
    finally:
        with _lock:
            _entries -= 1
            _strict_entries -= strict
            fallback.set_strict_entries(_strict_entries)
            if _entries == 0:
                _library._destroy()
                _library = None
                _stance.__exit__(None, None, None)   # the stance in force before the first entry
                _stance = None
