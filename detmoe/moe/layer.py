"""The MoE feed-forward layer: route, sort tokens by expert, run SwiGLU experts as grouped GEMMs,
combine each token's expert outputs, add optional shared experts.

With a layout (detmoe/moe/parallel.py) a rank holds E/W whole experts ("ep"), every expert's F/W columns
("tp"), or F/P columns of E/G experts (G groups of P ranks: "ep" with expert_tp=P), and F/W of the
shared experts; every rank routes the whole batch the same way.

Legend: T = tokens, D = d_model, E = experts, F = d_expert, S = expert slots per token,
A = kept assignments, W = ranks of the layout, G = ranks (or groups) over which experts are spread,
P = ranks that split each expert's F.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from detmoe import kernels
from detmoe.moe.config import MoEConfig, check_reduce_chunks
from detmoe.moe.parallel import (Layout, all_gather, all_reduce, gather_rows, mark_shard, row_parallel_grouped_matmul,
                          row_parallel_matmul, size_of)
from detmoe.moe.routers import router_from_config
from detmoe.moe.routing import ChunkState, Routing


class MoELayer(nn.Module):
    """`y, routing = layer(x, seq_ids)` for a ragged batch x [T, D] with seq_ids [T]."""

    def __init__(self, cfg: MoEConfig, d_model: int, dtype: Optional[torch.dtype] = None,
                 reduce_chunks: int = 4, layout: Optional[Layout] = None):
        super().__init__()
        self.cfg, self.d_model, self.reduce_chunks, self.layout = cfg, d_model, reduce_chunks, layout
        W = size_of(layout)
        E, Fd, Fs = cfg.n_experts, cfg.d_expert, cfg.n_shared_experts * cfg.d_expert
        check_reduce_chunks(reduce_chunks, d_expert=Fd)
        # whole experts spread over `ep` ranks; each expert's F split over `tp` ranks (either, both or none)
        self.ep = None if layout is None else layout.expert_ep_layout
        self.tp = None if layout is None else layout.expert_tp_layout
        G, P = size_of(self.ep), size_of(self.tp)
        if E % G:
            ranks = f"{G} ranks" if P == 1 else f"{G} expert-parallel groups ({layout})"
            raise ValueError(f"n_experts={E} must be divisible by the layout's {ranks} for experts='ep'")
        if reduce_chunks % P:
            raise ValueError(f"reduce_chunks={reduce_chunks} must be a multiple of the {P} ranks that split "
                             "each expert (one subtree of the down projection's sum per rank)")
        kw = dict(dtype=dtype)  # None: torch's default dtype, as for nn.Linear
        self.router = router_from_config(cfg)
        self.w_router = nn.Parameter(torch.empty(d_model, E, **kw))
        # gate and up projections, fused; "ep" splits the expert axis, "tp" each expert's F (gate and up alike)
        self.w_gate_up = nn.Parameter(torch.empty(E // G, d_model, 2 * Fd // P, **kw))
        self.w_down = nn.Parameter(torch.empty(E // G, Fd // P, d_model, **kw))
        for name, F_dim, parts in (("w_gate_up", 2, 2), ("w_down", 1, 1)):
            mark_shard(self, name, self.ep, dim=0)
            mark_shard(self, name, self.tp, dim=F_dim, parts=parts)
        if cfg.n_shared_experts:
            self.w_shared_gate_up = nn.Parameter(torch.empty(d_model, 2 * Fs // W, **kw))
            self.w_shared_down = nn.Parameter(torch.empty(Fs // W, d_model, **kw))
            mark_shard(self, "w_shared_gate_up", layout, dim=1, parts=2)
            mark_shard(self, "w_shared_down", layout, dim=0)
            if cfg.shared_expert_gate:
                self.w_shared_gate = nn.Parameter(torch.empty(d_model, 1, **kw))

    def forward(self, x: torch.Tensor, seq_ids: torch.Tensor, positions: Optional[torch.Tensor] = None,
                state: Optional[ChunkState] = None) -> tuple[torch.Tensor, Routing]:
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"x must have shape [tokens, d_model={self.d_model}], got {tuple(x.shape)}")
        if seq_ids.shape != (x.shape[0],):
            raise ValueError(f"seq_ids must have shape [tokens]={x.shape[0]}, got {tuple(seq_ids.shape)}")
        if x.shape[0] == 0:
            raise ValueError("x must hold at least one token")
        if positions is None:
            positions = _positions_in_sequence(seq_ids)
        routing = self.router(kernels.matmul(x, self.w_router), seq_ids, positions, state)
        y = self._experts(x, routing)
        if self.cfg.n_shared_experts:
            y = y + self._shared(x)
        return y, routing

    def _experts(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        S = routing.experts.shape[1]
        flat_experts = routing.experts.flatten()                                  # [T*S]
        # the assignments sorted by expert (stably) and each expert's group end, without a device sync
        if self.router.drops:
            kept = routing.kept.flatten().nonzero().squeeze(1)                    # token-major ids (a sync)
            by_expert, offsets = kernels.expert_sort(flat_experts[kept], self.cfg.n_experts)
            order = kept[by_expert]                                               # [A]
        else:  # dropless: every slot is kept
            order, offsets = kernels.expert_sort(flat_experts, self.cfg.n_experts)  # [T*S], [E]
        rows, run = order, None
        if self.ep is not None:  # this rank's experts own one contiguous run of the sorted order
            if order.shape[0] <= EP_DEVICE_RUN_MAX:
                rows, offsets, run = _local_run_on_device(order, offsets, self.ep)  # [A], [E/G], run
            else:
                rows, offsets, run = _local_run(order, offsets, self.ep)         # [A_r], [E/G], G ints
        # each assignment's token row through its expert's gate and up projections, silu(gate) * up (one
        # kernel on batch_invariant: no gathered copy of the rows, gate and up never written)
        act = kernels.grouped_swiglu(x, self.w_gate_up, offsets, rows, S)         # [A_r or A, F/P]
        if self.layout is not None and not kernels.get_backend().ordered_collectives:
            # stock: each rank combines the outputs it holds, then one all-reduce (as serving engines do)
            out = kernels.grouped_matmul(act, self.w_down, offsets)
            if isinstance(run, DeviceRun):   # rows past this rank's run were never computed: +0.0 cells
                out = out.masked_fill(~run.mine(out.shape[0])[:, None], 0.0)
            return all_reduce(self._combine(out, rows, routing, x), self.layout)
        # the chunk tree over F, its subtrees on the `tp` ranks (none: this rank holds its experts' whole F)
        out = row_parallel_grouped_matmul(act, self.w_down, offsets, self.reduce_chunks, self.tp)  # [A_r, D]
        if self.ep is not None:
            # every rank gets every expert's rows with the bits their rank (or TP group) computed: the
            # runs of the `ep` ranks, in their order, are the sorted order again
            out = run.gather(out, self.ep) if isinstance(run, DeviceRun) else gather_rows(out, run, self.ep)
        return self._combine(out, order, routing, x)

    def _combine(self, out: torch.Tensor, order: torch.Tensor, routing: Routing, x: torch.Tensor) -> torch.Tensor:
        """y [T, D]: each token's weighted expert outputs (out: the rows of `order`) summed in fp32."""
        if self.cfg.combine == "scatter_add":
            # what most MoE code does: atomic adds, order of arrival decides the rounding on GPU
            T, S = routing.experts.shape
            w = routing.weights.flatten()[order, None]
            acc = torch.promote_types(x.dtype, torch.float32)  # fp32 accumulate (fp64 stays fp64)
            y = torch.zeros(T, self.d_model, dtype=acc, device=x.device)
            y.index_add_(0, order // S, out.to(acc) * w)
            return y.to(x.dtype)
        # ordered: each token's slots 0..S-1 summed in that order in fp32 (one kernel on batch_invariant)
        return kernels.ordered_combine(out, order, routing.weights, x.dtype)

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        act = kernels.swiglu(kernels.matmul(x, self.w_shared_gate_up))                 # [T, Fs/W]
        y = row_parallel_matmul(act, self.w_shared_down, self.reduce_chunks, self.layout)
        if self.cfg.shared_expert_gate:
            y = y * kernels.sigmoid(kernels.matmul(x, self.w_shared_gate))
        return y


# Up to this many (token, slot) assignments an expert-parallel layer finds its rank's run of the sorted
# rows on the device, computes into a buffer of all A rows and all-gathers the buffers: no host sync, so
# a decode step can be captured in a CUDA graph. Above it (prefill), it reads the runs' bounds on the
# host and gathers only the rows, as the buffers would move W times the rows. The same rows are computed
# and gathered either way, so with batch_invariant the bits do not depend on which path runs (the stock
# grouped GEMM may pick its tiles by the row count, which differs: one more way its bits vary).
EP_DEVICE_RUN_MAX = 4096


@dataclass
class DeviceRun:
    """Where each rank's run of the sorted assignments lies, as device tensors: runs [starts[g], ends[g])."""
    starts: torch.Tensor   # [G] int64
    ends: torch.Tensor     # [G] int64
    rank: int

    def mine(self, n: int) -> torch.Tensor:
        """[n] bool: which of this rank's buffer rows (its run, first) hold its own experts' rows."""
        return torch.arange(n, device=self.ends.device) < self.ends[self.rank] - self.starts[self.rank]

    def gather(self, out: torch.Tensor, layout: Layout) -> torch.Tensor:
        """out [A, D] (this rank's run first, then rows it did not compute) -> [A, D] in sorted order,
        each row from the rank that computed it (a copy)."""
        A = out.shape[0]
        gathered = all_gather(out, layout)                                            # [G, A, D]
        i = torch.arange(A, device=out.device)
        owner = torch.searchsorted(self.ends, i, right=True)                         # [A]
        return gathered[owner, i - self.starts[owner]]


def _local_run_on_device(order: torch.Tensor, offsets: torch.Tensor,
                         layout: Layout) -> tuple[torch.Tensor, torch.Tensor, DeviceRun]:
    """`_local_run` without a host sync: all A assignments rotated so that this rank's run comes first
    (the rest are other ranks' rows, distinct cells that its grouped GEMMs leave alone, as they lie past
    its last group end), its experts' group ends relative to the run, and the runs' bounds."""
    E_local = offsets.shape[0] // layout.size
    ends = offsets[E_local - 1::E_local].long()                                    # [G] runs' ends
    starts = F.pad(ends[:-1], (1, 0))
    r, A = layout.rank, order.shape[0]
    rotated = order[(starts[r] + torch.arange(A, device=order.device)) % A]
    local_offsets = offsets[r * E_local:(r + 1) * E_local] - starts[r].to(offsets.dtype)
    return rotated, local_offsets, DeviceRun(starts, ends, r)


def _local_run(order: torch.Tensor, offsets: torch.Tensor,
               layout: Layout) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """This rank's run of the sorted assignments, its experts' group ends relative to the run, and every
    rank's run length (one device sync, for the runs' bounds). `layout`: the ranks over which whole
    experts are spread (with expert_tp, one per group: the run is its group's)."""
    W, E_local = layout.size, offsets.shape[0] // layout.size
    ends = offsets[E_local - 1::E_local].tolist()                                  # [W] runs' ends
    starts = [0] + ends[:-1]
    r = layout.rank
    return (order[starts[r]:ends[r]], offsets[r * E_local:(r + 1) * E_local] - starts[r],
            [e - s for s, e in zip(starts, ends)])


def _positions_in_sequence(seq_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its sequence, counting in batch order (for a layer used alone)."""
    _, dense = torch.unique(seq_ids, return_inverse=True)
    one_hot = F.one_hot(dense).long()
    return (torch.cumsum(one_hot, 0) - 1).gather(1, dense[:, None]).squeeze(1)
