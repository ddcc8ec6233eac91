"""No host<->device sync inside a layer where the result does not need one.

On a GPU every op whose output size or value the host must know (`.item()`, `int(t)`, `nonzero`,
`unique`, `bincount`, boolean-mask indexing, `repeat_interleave` without `output_size`) stalls the host
until the GPU catches up. We count those ops as they are dispatched (on the CPU, where the same ops
run), with a stub backend so that only the model's own code is counted, not a kernel's.
"""
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from detmoe import kernels
from detmoe import moe
from detmoe.kernels.torch_backend import TorchBackend
from tests.conftest import random_prompts, tiny_config

aten = torch.ops.aten
ALWAYS_SYNC = {aten._local_scalar_dense.default, aten.nonzero.default, aten._unique2.default,
               aten.unique_dim.default, aten.unique_consecutive.default, aten.bincount.default,
               aten.masked_select.default}


def _is_sync(func, args, kwargs) -> bool:
    if func in ALWAYS_SYNC:
        return True
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return any(i is not None and i.dtype == torch.bool for i in args[1])
    return False


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self.ops.append(str(func))
        return func(*args, **kwargs)


class StubBackend(TorchBackend):
    """Stock ops that need no sync; attention and the expert GEMM replaced by sync-free stand-ins."""
    name = "sync_stub"

    def grouped_matmul(self, x, w, offsets):
        expert = torch.bucketize(torch.arange(x.shape[0]), offsets.long(), right=True)
        return torch.einsum("tk,tkn->tn", x, w[expert])

    def attention(self, q, k_cache, v_cache, cu_seqlens_q, kv_lens, slots, scale):
        return q * scale


kernels.register_backend(StubBackend.name, StubBackend)


def count_syncs(model, prompts, cache=None, slots=None) -> list[str]:
    tokens, cu = moe.cu_seqlens_of(prompts)  # host tensors, as the serving engine passes them
    with kernels.use_backend(StubBackend.name), SyncCounter() as counter:
        model(tokens, cu, cache, slots)
    return counter.ops


@pytest.mark.parametrize("router", moe.ROUTERS)
def test_layers_add_no_syncs_beyond_dropping_routers_nonzero(seed, router):
    """A step through a cache: the dropless router syncs nowhere in its layers; a router that can drop
    syncs once per layer (the kept assignments' count is data: nonzero), and nothing else does."""
    for n_layers in (1, 3):
        cfg = dataclasses.replace(tiny_config(router), n_layers=n_layers)
        model = moe.MoETransformer(cfg)
        cache = model.new_cache(4, 32)
        prompts = random_prompts(3, cfg.vocab_size, 1, 9)
        ops = count_syncs(model, prompts, cache, torch.tensor([2, 0, 3]))
        expected = 0 if router == "topk" else n_layers
        assert ops == ["aten.nonzero.default"] * expected, ops
        # and a decode step over the same cache
        ops = count_syncs(model, [[1], [2], [3]], cache, torch.tensor([2, 0, 3]))
        assert ops == ["aten.nonzero.default"] * expected, ops


def test_sequence_capacity_router_alone_counts_its_sequences_once(seed):
    """Without a state (a router used alone) the number of sequences is read once; with one, never."""
    r = moe.build_router("sequence_capacity", n_experts=8, top_k=2, group_size=4)
    logits = torch.randn(10, 8)
    seq_ids = torch.tensor([5, 5, 2, 2, 2, 9, 5, 9, 2, 2])
    positions = torch.tensor([0, 1, 0, 1, 2, 0, 2, 1, 3, 4])
    with SyncCounter() as counter:
        routing = r(logits, seq_ids, positions)
    assert counter.ops == ["aten._local_scalar_dense.default"]
    with SyncCounter() as counter:
        r(logits, seq_ids, positions + 5, routing.state)
    assert counter.ops == []


def test_sync_free_replacements_equal_what_they_replace(seed):
    """Each sync-free form gives exactly the result of the op it replaced, on random data."""
    from detmoe.moe.routers.base import rank_in_queue
    from detmoe.moe.routers.sequence_capacity import _dense_ids
    for _ in range(20):
        labels = torch.randint(-5, 40, (int(torch.randint(1, 60, ())),))
        assert torch.equal(_dense_ids(labels), torch.unique(labels, return_inverse=True)[1])
        A, E = labels.numel(), 6
        experts, priority = torch.randint(0, E, (A,)), torch.randint(0, 10, (A,))
        chunk, seq = torch.randint(0, 4, (A,)), torch.randint(0, 3, (A,))
        # before: one group key, seq * (max chunk + 1) + chunk, and expert ids folded in by max expert + 1
        order = torch.argsort(priority, stable=True)
        order = order[torch.argsort(experts[order], stable=True)]
        group = seq * (int(chunk.max()) + 1) + chunk
        order = order[torch.argsort(group[order], stable=True)]
        key = group[order] * (int(experts.max()) + 1) + experts[order]
        starts = torch.ones_like(key, dtype=torch.bool)
        starts[1:] = key[1:] != key[:-1]
        idx = torch.arange(A)
        expected = torch.empty_like(idx)
        expected[order] = idx - torch.cummax(torch.where(starts, idx, 0), 0).values
        assert torch.equal(rank_in_queue(experts, priority, (chunk, seq)), expected)
        # the MoE layer's group ends: searchsorted over the sorted ids == cumsum of a bincount
        ids = torch.sort(experts).values
        assert torch.equal(torch.searchsorted(ids, torch.arange(E), right=True),
                           torch.cumsum(torch.bincount(ids, minlength=E), 0))
