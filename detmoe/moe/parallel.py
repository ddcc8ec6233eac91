"""Tensor- and expert-parallel layouts over `torch.distributed`, with cross-rank sums whose bits do not
depend on the layout.

    dist.init_process_group("nccl")                      # one process per GPU (gloo: CPU processes)
    layout = moe.Layout(attention="tp", experts="ep")      # over every rank of the default group
    layout = moe.Layout(attention="tp", experts="ep", expert_tp=2)   # or: EP over pairs, TP inside a pair
    model = moe.MoETransformer(cfg, device=dev, layout=layout)
    logits, routings = model(tokens, cu_seqlens)           # the same batch on every rank; full logits

Every rank gets the whole batch and returns the whole logits, so callers (`generate`, the serving
engine) do not change. What is split (W = ranks, r = this rank):
- attention (`"tp"`, Megatron style): query and key/value heads; wq/wk/wv by columns, wo by rows;
- experts `"ep"`: experts r*E/W .. (r+1)*E/W - 1 whole on rank r; `"tp"`: every expert's d_expert;
  `"ep"` with `expert_tp=P` (two dimensions, "ep{G}xtp{P}"): the ranks form G = W/P expert-parallel
  groups of P neighbours; group g = r // P holds experts g*E/G .. (g+1)*E/G - 1, and its rank at TP
  position r % P holds those experts' d_expert/P columns;
- shared experts: d_expert, as dense tensor-parallel MLPs (over all W ranks in every layout).
Embedding, norms, router and LM head are replicated (their inputs are the same bits on every rank).

Where the ranks' results meet, the backend decides how (`Backend.ordered_collectives`):
- `batch_invariant`: a row-parallel matmul (attention output, expert and shared-expert down
  projections) sums its K axis as a balanced tree over `cfg.reduce_chunks` equal chunks. Rank r owns a
  subtree (chunks r*C/W .. (r+1)*C/W - 1) and sums it in fp32 in the same tree shape
  (`kernels.matmul_chunk_sum`: inside the GEMM where that pays, `kernels.ops.matmul.one_kernel_sum`); the rest of the
  tree runs across ranks (`cross_rank_sum`: an all-gather of the ranks' fp32 subtree sums for small
  sums; for large ones an all-to-all of fp32 pieces, the additions in tree order, an all-gather of the
  rounded pieces): the same additions in the same order on 1, 2 or 4 ranks, and one device runs the
  same tree.
  Expert outputs (EP) travel back as copies, each rank's run of rows in rank order, and the combine
  runs as on one device. With expert_tp=P the experts' down projection runs that tree over the P ranks
  of a group (P subtrees), then the groups' runs travel as copies.
- `torch`: what serving engines do: each rank's rounded partial product, summed by an all-reduce
  (NCCL picks ring or tree by size and rank count), and EP ranks combine their own experts' outputs,
  then all-reduce (over all W ranks, expert_tp or not). Its bits change with the layout: the
  `collective` source of variance.

Not for: layouts across hosts (nothing here is specific to one host, but it is only tested on one),
pipeline parallelism, or `qk_norm="full"` (its norm would need a sum across the head shards).

Legend: T = tokens, W = ranks in the layout, C = cfg.reduce_chunks, N = output width.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from detmoe import kernels

if TYPE_CHECKING:
    from detmoe.moe.config import ModelConfig

# renamed in newer torch (the old name warns there)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

ATTENTION_LAYOUTS = ("tp",)
EXPERT_LAYOUTS = ("ep", "tp")


@dataclass(frozen=True)
class Layout:
    """How one model is spread over the ranks of `group` (default: all ranks of the default group)."""

    attention: str = "tp"              # one of ATTENTION_LAYOUTS
    experts: str = "ep"                # one of EXPERT_LAYOUTS
    expert_tp: int = 1                 # > 1 (experts "ep" only): ranks that split each expert's d_expert
    group: Optional[dist.ProcessGroup] = field(default=None, compare=False)
    # expert_tp > 1: the sub-layouts __post_init__ builds (see `expert_ep_layout`, `expert_tp_layout`)
    _ep: Optional["Layout"] = field(default=None, init=False, compare=False, repr=False)
    _tp: Optional["Layout"] = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_LAYOUTS:
            raise ValueError(f"attention must be one of {ATTENTION_LAYOUTS}, got {self.attention!r}")
        if self.experts not in EXPERT_LAYOUTS:
            raise ValueError(f"experts must be one of {EXPERT_LAYOUTS}, got {self.experts!r}")
        if not isinstance(self.expert_tp, int) or self.expert_tp < 1:
            raise ValueError(f"expert_tp must be a positive int, got {self.expert_tp!r}")
        if self.expert_tp > 1 and self.experts != "ep":
            raise ValueError(f"expert_tp={self.expert_tp} needs experts='ep' (experts='tp' already splits "
                             "every expert over all ranks)")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("a Layout needs a torch.distributed process group: call "
                             "dist.init_process_group(...) first (torchrun sets the environment)")
        if self.expert_tp > 1:
            W = self.size
            if W % self.expert_tp:
                raise ValueError(f"expert_tp={self.expert_tp} must divide the layout's {W} ranks")
            if W != dist.get_world_size():
                raise ValueError("expert_tp > 1 needs a layout over every rank (group=None): every process "
                                 "makes its sub-groups")
            ep_group, tp_group = _expert_groups(self.group, self.expert_tp)
            object.__setattr__(self, "_ep", Layout(self.attention, "ep", group=ep_group))
            object.__setattr__(self, "_tp", Layout(self.attention, "tp", group=tp_group))

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def expert_ep_layout(self) -> Optional["Layout"]:
        """The ranks over which whole experts are spread, this one among them (with expert_tp > 1: one
        rank per group, at this rank's TP position, ranked by group); None if every rank holds every expert."""
        if self.experts != "ep":
            return None
        return self._ep if self.expert_tp > 1 else self

    @property
    def expert_tp_layout(self) -> Optional["Layout"]:
        """The ranks that split each of this rank's experts by d_expert, this one among them; None if
        this rank holds its experts whole."""
        if self.experts == "tp":
            return self
        return self._tp if self.expert_tp > 1 else None

    def __str__(self) -> str:
        experts = (f"ep{self.size // self.expert_tp}xtp{self.expert_tp}" if self.expert_tp > 1
                   else f"{self.experts}x{self.size}")
        return f"attention={self.attention}x{self.size},experts={experts}"

    def check(self, cfg: "ModelConfig") -> None:
        """Raise ValueError naming what in `cfg` (a ModelConfig) this layout cannot split."""
        W, C = self.size, cfg.reduce_chunks   # (ModelConfig checks that C divides every row-parallel K)
        needs = [
            (C % W == 0, f"reduce_chunks={C} must be a multiple of the layout's {W} ranks (its sums are "
                         "trees over that many chunks, one subtree per rank)"),
            (cfg.n_heads % W == 0, f"n_heads={cfg.n_heads} must be divisible by the {W} ranks"),
            (cfg.n_kv_heads % W == 0, f"n_kv_heads={cfg.n_kv_heads} must be divisible by the {W} ranks"),
            (cfg.qk_norm != "full", "qk_norm='full' normalises all heads together and cannot be split "
                                    "by heads; use a layout-free model"),
        ]   # (the experts' split is checked by MoELayer, which can be built alone)
        for ok, why in needs:
            if not ok:
                raise ValueError(f"layout {self} cannot split this model: {why}")


_EXPERT_GROUPS: dict = {}   # (base group, expert_tp) -> (EP group, TP group) of this rank


def _expert_groups(group: Optional[dist.ProcessGroup], expert_tp: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """This rank's EP group (the ranks at its TP position, one per group) and TP group (its expert_tp
    neighbours). dist.new_group must be called by every process, for every group, in the same order:
    all of them are made here, once per base group (layouts are built again and again by the apps)."""
    base = group or dist.group.WORLD
    key = (base, expert_tp)
    if key not in _EXPERT_GROUPS:
        W, r = dist.get_world_size(base), dist.get_rank(base)
        ranks = [dist.get_global_rank(base, i) for i in range(W)]
        tp_groups = [dist.new_group(ranks[g * expert_tp:(g + 1) * expert_tp]) for g in range(W // expert_tp)]
        ep_groups = [dist.new_group(ranks[p::expert_tp]) for p in range(expert_tp)]
        _EXPERT_GROUPS[key] = ep_groups[r % expert_tp], tp_groups[r // expert_tp]
    return _EXPERT_GROUPS[key]


# ---- which part of a full tensor a rank holds ----

@dataclass(frozen=True)
class Shard:
    """This rank's part of a parameter: block `rank` of `size` along `dim`. `parts` > 1 means the
    dimension holds that many fused tensors side by side (gate|up), each split the same way. `then`:
    a split of that block along another dim too (an expert weight in a two-dimensional layout)."""
    dim: int
    rank: int
    size: int
    parts: int = 1
    then: Optional["Shard"] = None

    def __post_init__(self) -> None:
        if self.then is not None and self.dim in [s.dim for s in self.then.splits]:
            raise ValueError(f"a Shard splits each dim once: dim={self.dim} is split again by `then`")

    @property
    def splits(self) -> tuple["Shard", ...]:
        """One single-dim Shard per split dim (they commute: each cuts its own dim)."""
        one = Shard(self.dim, self.rank, self.size, self.parts)
        return (one,) if self.then is None else (one, *self.then.splits)

    def full_shape(self, local: torch.Size) -> torch.Size:
        shape = list(local)
        for s in self.splits:
            shape[s.dim] *= s.size
        return torch.Size(shape)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """The local block of a full tensor (a copy, contiguous)."""
        for s in self.splits:
            pieces = full.chunk(s.parts, dim=s.dim)
            full = torch.cat([p.chunk(s.size, dim=s.dim)[s.rank] for p in pieces], dim=s.dim)
        return full.contiguous()


def mark_shard(module: torch.nn.Module, name: str, layout: Optional[Layout], dim: int, parts: int = 1) -> None:
    """Record that `module.<name>` was created with this rank's part of the full shape along `dim`
    (no-op without a layout, or one of one rank); a parameter split along two dims is marked once per
    dim. Kept on the module, by name: parameters are replaced by `.to_empty()` and the like."""
    if layout is not None and layout.size > 1:
        shards = module.__dict__.setdefault("_shards", {})
        shards[name] = Shard(dim, layout.rank, layout.size, parts, then=shards.get(name))


def shards_of(model: torch.nn.Module) -> dict[str, Shard]:
    """Parameter name (as `named_parameters` gives it) -> its Shard, for every sharded parameter."""
    return {f"{prefix}.{name}" if prefix else name: shard for prefix, module in model.named_modules()
            for name, shard in module.__dict__.get("_shards", {}).items()}


@torch.no_grad()
def shard_model(model: torch.nn.Module, layout: Layout) -> torch.nn.Module:
    """The same model spread over `layout`: a new MoETransformer holding this rank's part of `model`'s
    weights (for a model trained or loaded on one device, e.g. an RL sampler on another layout than its
    trainer). `model` must be layout-free."""
    from detmoe.moe.model import MoETransformer  # (the model imports this module)
    if getattr(model, "layout", None) is not None:
        raise ValueError("model must be layout-free (layout=None) to be sharded")
    sharded = MoETransformer(model.cfg, device="meta", layout=layout).to_empty(device=model.device)
    sharded.to(model.dtype)
    shards, full = shards_of(sharded), dict(model.named_parameters())
    for name, p in sharded.named_parameters():
        shard = shards.get(name)
        p.copy_(full[name] if shard is None else shard.take(full[name]))
    return sharded


def size_of(layout: Optional[Layout]) -> int:
    """Ranks in the layout (1 without one)."""
    return 1 if layout is None else layout.size


# ---- sums across ranks ----

def row_parallel_matmul(x: torch.Tensor, w: torch.Tensor, chunks: int, layout: Optional[Layout]) -> torch.Tensor:
    """x [T, K/W] @ w [K/W, N] summed over the ranks' K shards -> [T, N] in x's dtype. `chunks` is the
    full K's chunk count (C); this rank holds C/W of them."""
    W = size_of(layout)
    if kernels.get_backend().ordered_collectives:
        if W == 1:   # the whole tree at once (in the GEMM's registers where K <= 2048), rounded once
            return kernels.matmul_chunk_sum(x, w, chunks, x.dtype)
        subtree = kernels.matmul_chunk_sum(x, w, chunks // W, torch.float32)   # this rank's C/W leaves
        return cross_rank_sum(subtree, layout, x.dtype)
    return all_reduce(kernels.matmul(x, w), layout)


def row_parallel_grouped_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, chunks: int,
                                layout: Optional[Layout]) -> torch.Tensor:
    """`row_parallel_matmul` for the experts' grouped GEMM (w [E, K/W, N])."""
    W = size_of(layout)
    if kernels.get_backend().ordered_collectives:
        if W == 1:
            return kernels.grouped_matmul_chunk_sum(x, w, offsets, chunks, x.dtype)
        subtree = kernels.grouped_matmul_chunk_sum(x, w, offsets, chunks // W, torch.float32)
        return cross_rank_sum(subtree, layout, x.dtype)
    return all_reduce(kernels.grouped_matmul(x, w, offsets), layout)


# Below this many bytes of fp32 subtree sum per rank, `cross_rank_sum` is one
# all-gather of the whole subtree sums (W x the bytes, one collective); above it, an all-to-all then an
# all-gather (about 1.5x a ring all-reduce's bytes, two collectives). Decode steps take the first form,
# where launches and latency dominate; prefill the second, where bandwidth does. 4 MiB covers a decode
# step of 256 tokens at width 4096 (and 64 tokens x 2 expert slots of tensor-parallel experts): at 1 MiB
# the wide preset's 64-token eager decode took the two-collective form and was slower than the
# all-reduce (docs/results.md, "Step time"). Both forms add the same numbers in the same tree, so the
# bits do not depend on which one runs.
GATHER_BELOW_BYTES = 4 << 20


def cross_rank_sum(subtree: torch.Tensor, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    """This rank's fp32 subtree sum (of its C/W leaves) -> the W ranks' subtrees added in the tree's order
    (rank 0's first), rounded once to `dtype`: one balanced binary tree over all C leaves, whose subtrees
    are the ranks' leaves, so every rank gets the bits one process summing all C leaves would.

    An all-reduce built from copies (no arithmetic inside a collective). Small sums: every rank
    all-gathers the W subtree sums and adds them in the tree's order. Large ones: an all-to-all hands
    rank j the j-th 1/W of every rank's subtree sum, rank j adds those W pieces in the tree's order and
    rounds them, and an all-gather of the rounded pieces gives every rank the whole result. Each tree
    runs as one kernel with its rounding (`kernels.tree_sum`)."""
    W = layout.size
    if subtree.numel() == 0:   # (no rows: an expert group that got no tokens, alike on its ranks)
        return subtree.to(dtype)
    if subtree.numel() * subtree.element_size() < GATHER_BELOW_BYTES:
        return kernels.tree_sum(all_gather(subtree, layout), dtype)
    flat = subtree.flatten()
    n = -(-flat.numel() // W) * W
    pieces = torch.nn.functional.pad(flat, (0, n - flat.numel())).view(W, n // W)      # [W, n/W]
    received = torch.empty_like(pieces)                  # received[i]: rank i's piece of this rank's part
    dist.all_to_all_single(received, pieces, group=layout.group)
    mine = kernels.tree_sum(received, dtype)                                           # [n/W]
    return all_gather(mine, layout).flatten()[:flat.numel()].view(subtree.shape)


def all_gather(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[W, *x.shape]: every rank's x, in rank order (a copy, no arithmetic)."""
    x = x.contiguous()
    out = x.new_empty((layout.size * x.shape[0], *x.shape[1:]))   # concatenated: the form gloo takes too
    _all_gather_single(out, x, group=layout.group)
    return out.view(layout.size, *x.shape)


def gather_rows(rows: torch.Tensor, counts: list[int], layout: Layout) -> torch.Tensor:
    """Every rank's rows [counts[r], D], concatenated in rank order (a copy): rows padded to the largest
    count for the all-gather, the padding dropped after."""
    most = max(counts)
    padded = rows.new_zeros(most, *rows.shape[1:])
    padded[:rows.shape[0]] = rows
    gathered = all_gather(padded, layout)                                              # [W, most, D]
    return torch.cat([gathered[r, :n] for r, n in enumerate(counts)])


def broadcast_seed(seed: int, layout: Layout) -> int:
    """Rank 0's seed on every rank (a sampler drawing on several ranks must draw the same tokens)."""
    box = [seed]
    dist.broadcast_object_list(box, src=dist.get_global_rank(layout.group or dist.group.WORLD, 0),
                               group=layout.group)
    return box[0]


def all_reduce(x: torch.Tensor, layout: Optional[Layout]) -> torch.Tensor:
    """The stock cross-rank sum (in place, in x's dtype), as serving engines do it."""
    if size_of(layout) > 1:
        dist.all_reduce(x, group=layout.group)
    return x
