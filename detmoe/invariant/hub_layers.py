"""A model's RMSNorm layers on detmoe's RMSNorm kernel, through the layer mapping of Hugging Face's
`kernels` package (the extension point transformers marks its norms with: `use_kernel_forward_from_hub
("RMSNorm")` on MixtralRMSNorm, Qwen3MoeRMSNorm, OlmoeRMSNorm, Qwen2MoeRMSNorm and many more).

`kernelize` gives each marked instance the forward of the layer class its mapping names; here the mapping
names `InvariantRMSNorm` through an in-memory repository (kernels accepts any repository with a `load()`,
no files). `kernelized_norms(model)` does this for a block and gives every touched module its own forward
back afterwards (kernelize sets forwards on instances only, never on classes).

Norms are also batch-invariant without this (the mode's `mean` override covers transformers' RMSNorm,
whose mean of squares is its only reduction); the mapping runs each norm as one kernel instead of six ops.
Before mapping, every RMSNorm class of the model is checked against its own forward on random rows: a
class that computes something else under the same name (a (1 + weight) norm, another dtype rule) keeps its
own forward, with a warning.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

from detmoe import kernels
from detmoe.invariant.aten_ops import AUTOGRAD, Unsupported, check_kernel_inputs, needs_grad
from detmoe.invariant.fallback import fall_back, override_body

LAYER_NAME = "RMSNorm"


class InvariantRMSNorm(torch.nn.Module):
    """The forward `kernels` puts on a model's RMSNorm instances: `self` is the model's own module, with its
    `weight` and `variance_epsilon` (kernels forbids this class any member but `forward`)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        with override_body(), kernels.use_backend("batch_invariant"):
            try:
                if needs_grad(hidden_states, self.weight):
                    raise Unsupported(AUTOGRAD)
                check_kernel_inputs(hidden_states, self.weight)
                return kernels.rms_norm(hidden_states, self.weight, float(self.variance_epsilon))
            except Unsupported as e:
                fall_back("RMSNorm layer", str(e))
        return type(self).forward(self, hidden_states)   # the model's own norm (inside the mode: invariant)


class InMemoryLayerRepository:
    """A `kernels` layer repository holding a class already imported (kernels caches by repository, so
    equal repositories hash alike)."""

    def __init__(self, layer: type[torch.nn.Module]):
        self.layer = layer
        self.layer_name = layer.__name__

    def load(self) -> type[torch.nn.Module]:
        return self.layer

    def __eq__(self, other) -> bool:
        return isinstance(other, InMemoryLayerRepository) and other.layer is self.layer

    def __hash__(self) -> int:
        return hash((InMemoryLayerRepository, self.layer))


def _norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if getattr(type(m), "kernel_layer_name", None) == LAYER_NAME]


def _computes_the_same(norm: torch.nn.Module) -> bool:
    """InvariantRMSNorm's forward agrees with the class's own on random rows (dtype, shape, values)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not hasattr(norm, "variance_epsilon"):
        return False
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(3, weight.shape[0], generator=gen).to(weight.device, weight.dtype)
    with torch.no_grad():
        own = type(norm).forward(norm, x)
        ours = InvariantRMSNorm.forward(norm, x)
    tol = 1e-4 if weight.dtype == torch.float32 else 2e-2
    return own.dtype == ours.dtype and own.shape == ours.shape and torch.allclose(own.float(), ours.float(),
                                                                                   rtol=tol, atol=tol)


@contextlib.contextmanager
def kernelized_norms(model: torch.nn.Module) -> Iterator[int]:
    """The model's RMSNorm instances on InvariantRMSNorm for the block; yields how many. Yields 0 (and
    changes nothing) without the `kernels` package or where a norm class fails the check."""
    try:
        from kernels import Mode, kernelize, use_kernel_mapping
    except ImportError:
        yield 0
        return
    norms = _norms(model)
    checked = {}
    for norm in norms:
        if type(norm) not in checked:
            checked[type(norm)] = _computes_the_same(norm)
    if not norms or not all(checked.values()):
        odd = sorted(c.__name__ for c, ok in checked.items() if not ok)
        if odd:
            fall_back("RMSNorm layer mapping", f"{', '.join(odd)} compute(s) another norm under that name; "
                                               f"they keep their own forward")
        yield 0
        return
    # kernelize sets (or removes) `forward` and `_kernel_repo` on instances of marked classes, also of other
    # layer names; these are put back exactly as they were
    touched = [m for m in model.modules() if hasattr(type(m), "kernel_layer_name")]
    touched += [f for m in model.modules() for f in (getattr(m, "_kernel_funcs", None) or {}).values()]
    saved = [(m, {k: m.__dict__[k] for k in ("forward", "_kernel_repo") if k in m.__dict__}) for m in touched]
    device = next(model.parameters()).device
    repo = InMemoryLayerRepository(InvariantRMSNorm)
    log = logging.getLogger("kernels")
    level = log.level
    log.setLevel(logging.ERROR)   # kernelize logs a warning per instance of each layer name not mapped
    try:
        with use_kernel_mapping({LAYER_NAME: {device.type: repo}}, inherit_mapping=False):
            kernelize(model, mode=Mode.INFERENCE, device=device)
    finally:
        log.setLevel(level)
    try:
        yield len(norms)
    finally:
        for m, attrs in saved:
            for k in ("forward", "_kernel_repo"):
                m.__dict__.pop(k, None)
            m.__dict__.update(attrs)
