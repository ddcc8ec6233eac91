"""Tensor- and expert-parallel layouts over `torch.distributed`, with cross-rank sums whose bits do not
depend on the layout.

    dist.init_process_group("nccl")                      # one process per GPU (gloo: CPU processes)
    layout = moe.Layout(attention="tp", experts="ep")      # over every rank of the default group
    model = moe.MoETransformer(cfg, device=dev, layout=layout)
    logits, routings = model(tokens, cu_seqlens)           # the same batch on every rank; full logits

Every rank gets the whole batch and returns the whole logits, so callers (`generate`, the serving
engine) do not change. What is split (W = ranks, r = this rank):
- attention (`"tp"`, Megatron style): query and key/value heads; wq/wk/wv by columns, wo by rows;
- experts `"ep"`: experts r*E/W .. (r+1)*E/W - 1 whole on rank r; `"tp"`: every expert's d_expert;
- shared experts: d_expert, as dense tensor-parallel MLPs.
Embedding, norms, router and LM head are replicated (their inputs are the same bits on every rank).

Where the ranks' results meet, the backend decides how (`Backend.ordered_collectives`):
- `batch_invariant`: a row-parallel matmul (attention output, expert and shared-expert down
  projections) sums its K axis as a balanced tree over `cfg.reduce_chunks` equal chunks. Rank r owns a
  subtree (chunks r*C/W .. (r+1)*C/W - 1) and sums it in fp32 in the same tree shape; the rest of the
  tree runs across ranks (`ordered_sum`: an all-to-all of fp32 pieces, the additions in tree order,
  an all-gather of the rounded pieces): the same additions in the same order on 1, 2 or 4 ranks, and
  one device runs the same tree. Expert outputs (EP) travel back as copies, each rank's run of rows in
  rank order, and the combine runs as on one device.
- `torch`: what serving engines do: each rank's rounded partial product, summed by an all-reduce
  (NCCL picks ring or tree by size and rank count), and EP ranks combine their own experts' outputs,
  then all-reduce. Its bits change with the layout: the `collective` source of variance.

Not for: layouts across hosts (nothing here is specific to one host, but it is only tested on one),
pipeline parallelism, or `qk_norm="full"` (its norm would need a sum across the head shards).

Legend: T = tokens, W = ranks in the layout, C = cfg.reduce_chunks, N = output width.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

import kernels

if TYPE_CHECKING:
    from moe.config import ModelConfig

# renamed in newer torch (the old name warns there)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

ATTENTION_LAYOUTS = ("tp",)
EXPERT_LAYOUTS = ("ep", "tp")


@dataclass(frozen=True)
class Layout:
    """How one model is spread over the ranks of `group` (default: all ranks of the default group)."""

    attention: str = "tp"              # one of ATTENTION_LAYOUTS
    experts: str = "ep"                # one of EXPERT_LAYOUTS
    group: Optional[dist.ProcessGroup] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_LAYOUTS:
            raise ValueError(f"attention must be one of {ATTENTION_LAYOUTS}, got {self.attention!r}")
        if self.experts not in EXPERT_LAYOUTS:
            raise ValueError(f"experts must be one of {EXPERT_LAYOUTS}, got {self.experts!r}")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("a Layout needs a torch.distributed process group: call "
                             "dist.init_process_group(...) first (torchrun sets the environment)")

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    def __str__(self) -> str:
        return f"attention={self.attention}x{self.size},experts={self.experts}x{self.size}"

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


# ---- which part of a full tensor a rank holds ----

@dataclass(frozen=True)
class Shard:
    """This rank's part of a parameter: block `rank` of `size` along `dim`. `parts` > 1 means the
    dimension holds that many fused tensors side by side (gate|up), each split the same way."""
    dim: int
    rank: int
    size: int
    parts: int = 1

    def full_shape(self, local: torch.Size) -> torch.Size:
        shape = list(local)
        shape[self.dim] *= self.size
        return torch.Size(shape)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """The local block of a full tensor (a copy, contiguous)."""
        pieces = full.chunk(self.parts, dim=self.dim)
        return torch.cat([p.chunk(self.size, dim=self.dim)[self.rank] for p in pieces], dim=self.dim).contiguous()


def mark_shard(module: torch.nn.Module, name: str, layout: Optional[Layout], dim: int, parts: int = 1) -> None:
    """Record that `module.<name>` was created with this rank's part of the full shape (no-op without a
    layout). Kept on the module, by name: parameters are replaced by `.to_empty()` and the like."""
    if layout is not None and layout.size > 1:
        module.__dict__.setdefault("_shards", {})[name] = Shard(dim, layout.rank, layout.size, parts)


def shards_of(model: torch.nn.Module) -> dict[str, Shard]:
    """Parameter name (as `named_parameters` gives it) -> its Shard, for every sharded parameter."""
    return {f"{prefix}.{name}" if prefix else name: shard for prefix, module in model.named_modules()
            for name, shard in module.__dict__.get("_shards", {}).items()}


@torch.no_grad()
def shard_model(model: torch.nn.Module, layout: Layout) -> torch.nn.Module:
    """The same model spread over `layout`: a new MoETransformer holding this rank's part of `model`'s
    weights (for a model trained or loaded on one device, e.g. an RL sampler on another layout than its
    trainer). `model` must be layout-free."""
    from moe.model import MoETransformer  # (the model imports this module)
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
        partials = kernels.matmul_partials(x, w, chunks // W)                   # [C/W, T, N] fp32
        return ordered_sum(partials, layout, x.dtype)
    return all_reduce(kernels.matmul(x, w), layout)


def row_parallel_grouped_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, chunks: int,
                                layout: Optional[Layout]) -> torch.Tensor:
    """`row_parallel_matmul` for the experts' grouped GEMM (w [E, K/W, N])."""
    W = size_of(layout)
    if kernels.get_backend().ordered_collectives:
        partials = kernels.grouped_matmul_partials(x, w, offsets, chunks // W)   # [C/W, A, N] fp32
        return ordered_sum(partials, layout, x.dtype)
    return all_reduce(kernels.grouped_matmul(x, w, offsets), layout)


def ordered_sum(partials: torch.Tensor, layout: Optional[Layout], dtype: torch.dtype) -> torch.Tensor:
    """partials [C/W, ...] (fp32, this rank's leaves) -> the sum of all C leaves of all ranks, rounded to
    `dtype` once: one balanced binary tree whose subtrees are the ranks' leaves, the same bits for every W.

    Across ranks it is an all-reduce built from two copies (no arithmetic inside a collective): an
    all-to-all hands rank j the j-th 1/W of every rank's subtree sum, rank j adds those W pieces in the
    tree's order and rounds them, and an all-gather of the rounded pieces gives every rank the whole
    result. Bytes per rank: (W-1)/W of the fp32 sum out and of the rounded sum in, 1.5x NCCL's bf16 ring."""
    s = _tree_sum(partials)
    W = size_of(layout)
    if W == 1:
        return s.to(dtype)
    flat = s.flatten()
    n = -(-flat.numel() // W) * W
    pieces = torch.nn.functional.pad(flat, (0, n - flat.numel())).view(W, n // W)      # [W, n/W]
    received = torch.empty_like(pieces)                  # received[i]: rank i's piece of this rank's part
    dist.all_to_all_single(received, pieces, group=layout.group)
    mine = _tree_sum(received).to(dtype)                                               # [n/W]
    return all_gather(mine, layout).flatten()[:flat.numel()].view(s.shape)


def _tree_sum(p: torch.Tensor) -> torch.Tensor:
    """p [n, ...] with n a power of two -> ((p0 + p1) + (p2 + p3)) + ...: pairwise, level by level."""
    if p.shape[0] & (p.shape[0] - 1):
        raise ValueError(f"a tree sum needs a power-of-two number of leaves, got {p.shape[0]}")
    while p.shape[0] > 1:
        p = p[0::2] + p[1::2]
    return p[0]


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
