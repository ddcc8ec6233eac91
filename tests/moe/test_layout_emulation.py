"""What each rank of a W-rank layout (detmoe/moe/parallel.py) computes, emulated in ONE process on one
device, at the checkpoint widths of the presets `wide`, `large` and `qwen2_moe`, against the one-device bits.

No torch.distributed here: the ranks are threads of this process, each running the model's own code
(`parallel.row_parallel_matmul`, `parallel.row_parallel_grouped_matmul`, `parallel.cross_rank_sum` in both
its forms, `parallel.gather_rows`, `layer.DeviceRun.gather`, `layer._local_run[_on_device]`, and whole
`MoELayer.forward`s holding a rank's shards), with the two collectives the batch_invariant layouts use,
all-gather and all-to-all, emulated by copies between the threads (`FakeGroup`, `FakeDist`: any other
collective, e.g. the stock all_reduce, fails). A rank's layout is a `RankView`: what the modules read of
a `Layout` (rank, size, group, expert_ep_layout, expert_tp_layout), with the groups that `Layout` and
`parallel._expert_groups` make. The threads take turns (one computes at a time, `_TURN`), as the
interpreter's lock makes them anyway. What each rank holds comes from the Shards its own modules record
(parallel.mark_shard, read on the meta device) and `Shard.take`, as `parallel.shard_model` copies weights.

Checked, for each row-parallel product the layouts cut (attention output projection over heads, experts'
down projection over d_expert, shared experts' down projection over their d_expert), on W = 2 and 4 ranks
and the expert layouts tp, ep and ep2xtp2:
- by hand, with the kernels.* ops the ranks call: a rank's chunks of K (kernels.matmul_partials /
  grouped_matmul_partials of its shard) are the one-device partials of those chunks; its fp32 subtree
  (the kernels.*_chunk_sum of C/W leaves that row_parallel_* computes on a rank) stacked with the others
  in the order the all-gather delivers them (rank order) and added by kernels.tree_sum give the bits of
  the one-device kernels.*_chunk_sum of the whole product, rounded to the model's dtype and in fp32;
- expert parallelism: a rank's rows, computed with only its experts' weights and its group ends
  (`_local_run`), are the same rows of the all-experts grouped GEMM, and the runs in rank order are all of it;
- by the model's code: every rank's row_parallel_matmul result and every rank's MoE layer output is the
  one-device result bitwise.
The stock backend (`torch`: each rank's rounded partial product, then an all-reduce in rank order) is not
required to give these bits and is not run here (tests/moe/test_parallel.py shows it differs over gloo).
`test_controls_break_the_bits` shows that the checks can fail: another chunk count, another tree,
another grouping of a rank's leaves or another order of delivery changes the bits.

Two tiers: the default one (CPU: the Triton interpreter) keeps every K width and chunk count (e.g. the
`qwen2_moe` experts' K = 1408 in 4 chunks, one per rank of tp x4) with at most 8 rows and a narrow N
(`NARROW` output columns, which is also the narrow MoE layer's d_model); the `gpu` one runs the full
widths with T = 1, 16 and 512 tokens.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch

from detmoe import kernels, moe
from detmoe.kernels import runtime
from detmoe.moe import layer as moe_layer
from detmoe.moe import parallel
from detmoe.moe.attention import Attention
from detmoe.moe.layer import MoELayer
from detmoe.moe.parallel import Layout, Shard, shards_of

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# An expert-parallel rank that finds its run on the device computes into a buffer of all rows, of which
# the rows past its run are never written (layer.DeviceRun): the interpreter's numpy warns about
# overflows in whatever torch.empty left there (those rows are never read).
pytestmark = pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")
PRESETS = ("wide", "large", "qwen2_moe")
# (experts' layout, W): attention and shared experts are split over all W ranks in every one of them
LAYOUTS = (("tp", 2), ("tp", 4), ("ep", 2), ("ep", 4), ("ep2xtp2", 4))
NARROW = 16     # CPU tier: output columns of the row-parallel products (= the narrow MoE layer's d_model)
CPU_TOKENS = 8  # CPU tier: rows (tokens)
GPU_TOKENS = (1, 16, 512)
F32 = torch.float32


def preset(name: str) -> moe.ModelConfig:
    return moe.ModelConfig.from_name(name)


# ---- ranks as threads, collectives as copies ----

_ME = threading.local()        # .rank: the global rank the current thread plays
_TURN = threading.Lock()       # held by the one rank thread computing; released while it waits for the others
BARRIER_TIMEOUT_S = 900        # (a rank may compile kernels on the GPU while the others wait)


class FakeGroup:
    """A process group of the threads playing `ranks` (global ranks, in group order). `deliver`: the order
    in which a collective hands over the members' tensors (test hook; default the group order, as NCCL
    and gloo do)."""

    def __init__(self, ranks, deliver=None):
        self.ranks = list(ranks)
        self.deliver = list(range(len(self.ranks))) if deliver is None else list(deliver)
        self.reset()

    def reset(self) -> None:
        self.barrier = threading.Barrier(len(self.ranks), timeout=BARRIER_TIMEOUT_S)
        self.slots: list[Optional[torch.Tensor]] = [None] * len(self.ranks)

    def exchange(self, x: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
        """(this thread's index in the group, every member's x in delivery order)."""
        me = self.ranks.index(_ME.rank)
        self.slots[me] = x.clone()
        _wait(self.barrier)
        got = [self.slots[i] for i in self.deliver]
        _wait(self.barrier)          # nobody writes a slot again before all have read them
        return me, got


def _wait(barrier: threading.Barrier) -> None:
    _TURN.release()
    try:
        barrier.wait()
    finally:
        _TURN.acquire()


def fake_all_gather_into_tensor(out: torch.Tensor, x: torch.Tensor, group: FakeGroup) -> None:
    """dist.all_gather_into_tensor: every member's x concatenated along dim 0, in group order."""
    _, got = group.exchange(x)
    out.copy_(torch.cat(got))


class FakeDist:
    """What parallel.py calls on `torch.distributed` for a batch_invariant layout: all_to_all_single.
    Anything else (e.g. all_reduce, the stock sum) fails: it would be a collective this emulation
    does not expect."""

    @staticmethod
    def all_to_all_single(output: torch.Tensor, input: torch.Tensor, group: FakeGroup) -> None:
        """dist.all_to_all_single: input cut in len(group) equal parts along dim 0, part j to member j;
        output part i from member i."""
        me, got = group.exchange(input)
        output.copy_(torch.cat([g.chunk(len(got))[me] for g in got]))


@pytest.fixture
def emulated_collectives(monkeypatch):
    monkeypatch.setattr(parallel, "_all_gather_single", fake_all_gather_into_tensor)
    monkeypatch.setattr(parallel, "dist", FakeDist())


@pytest.fixture
def interpreter_fits(monkeypatch):
    """The interpreter's packed grouped GEMM (grouped_gemm._grouped_mm_packed_kernel) holds blocks of
    [next_pow2(E), PACKED_BLOCK_M=128, BLOCK_K] and [.., BLOCK_M, BLOCK_N]: at 64 experts (`large`,
    `qwen2_moe`) and a K chunk of 192 or 352 (BLOCK_K 256 or 512) that is 2-4 M elements, past Triton's
    2**20 per block, so the per-tile kernel runs instead (grouped_gemm.packed_fits), slowly under the
    interpreter. 16 rows per expert per program keep the packed one within the limit; a row's bits do not
    depend on its block under the interpreter (each output element is summed in one order fixed by K,
    runtime._ordered_dot), and no GPU runs this kernel."""
    if runtime.interpreting():
        from detmoe.kernels.ops import grouped_gemm
        monkeypatch.setattr(grouped_gemm, "PACKED_BLOCK_M", 16)


@dataclass(eq=False)
class RankView:
    """What the modules and parallel.py read of a rank's `Layout`: its rank and size in its group, the
    group, and for the MoE layer the ranks over which whole experts are spread (`expert_ep_layout`) and
    the ranks that split each expert's d_expert (`expert_tp_layout`)."""
    rank: int
    size: int
    group: FakeGroup
    name: str = ""
    ep: Optional["RankView"] = None
    tp: Optional["RankView"] = None

    @property
    def expert_ep_layout(self) -> Optional["RankView"]:
        return self.ep

    @property
    def expert_tp_layout(self) -> Optional["RankView"]:
        return self.tp

    def __str__(self) -> str:
        return f"{self.name} rank {self.rank}/{self.size}"


@dataclass
class Ranks:
    views: list[RankView]
    groups: list[FakeGroup]

    @property
    def size(self) -> int:
        return len(self.views)


def rank_views(experts: str, W: int, deliver=None) -> Ranks:
    """The W ranks' views of Layout(attention="tp", experts=...) over W ranks: "tp" (each expert's F split
    over all ranks), "ep" (E/W whole experts per rank), "ep2xtp2" (Layout(experts="ep", expert_tp=2):
    experts over 2 groups of 2 neighbours, each expert's F split inside a group; as in
    parallel._expert_groups: TP group g = ranks [2g, 2g+1], EP group p = ranks [p, p+2], rank r at TP
    position r % 2 of group r // 2). `deliver`: the world group's delivery order (test hook)."""
    world = FakeGroup(range(W), deliver)
    groups = [world]
    views = [RankView(r, W, world, f"{experts}x{W}") for r in range(W)]
    if experts == "tp":
        for v in views:
            v.tp = v
    elif experts == "ep":
        for v in views:
            v.ep = v
    elif experts == "ep2xtp2":
        P = 2
        assert W == 4, "ep2xtp2 is 2 groups of 2 ranks"
        tp_groups = [FakeGroup(range(g * P, (g + 1) * P)) for g in range(W // P)]
        ep_groups = [FakeGroup(range(p, W, P)) for p in range(P)]
        groups += tp_groups + ep_groups
        for r, v in enumerate(views):
            v.ep = RankView(r // P, W // P, ep_groups[r % P], f"ep group of rank {r}")
            v.tp = RankView(r % P, P, tp_groups[r // P], f"tp group of rank {r}")
    else:
        raise ValueError(experts)
    return Ranks(views, groups)


def run_ranks(ranks: Ranks, fn: Callable[[RankView], object]) -> list:
    """fn(view) on every rank, each in its own thread, under the caller's kernel backend (the backend in
    force is per thread: each rank process chooses its own); their results in rank order. A failure in
    any rank is raised here (the others, waiting at a collective, are released)."""
    for g in ranks.groups:
        g.reset()
    results: list = [None] * ranks.size
    errors: list[BaseException] = []
    backend = kernels.get_backend().name

    def play(r: int) -> None:
        _ME.rank = r
        _TURN.acquire()
        try:
            with kernels.use_backend(backend):
                results[r] = fn(ranks.views[r])
        except BaseException as e:   # noqa: BLE001 (re-raised in the main thread)
            errors.append(e)
            for g in ranks.groups:
                g.barrier.abort()
        finally:
            _TURN.release()

    threads = [threading.Thread(target=play, args=(r,), daemon=True) for r in range(ranks.size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BARRIER_TIMEOUT_S + 60)
    assert not any(t.is_alive() for t in threads), "a rank thread hangs"
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return results


# ---- what a rank holds ----

def module_shards(make: Callable[[], torch.nn.Module]) -> dict[str, Shard]:
    """The Shards a rank's module records for its parameters (parallel.mark_shard), built on the meta
    device: which block of each full tensor the rank holds, as parallel.shard_model copies it."""
    with torch.device("meta"):
        return shards_of(make())


def head_block(out: torch.Tensor, r: int, W: int) -> torch.Tensor:
    """The attention output [T, H, Dh] of rank r's heads (its wq/wk/wv column blocks: heads r*H/W ..
    (r+1)*H/W - 1) as Attention.forward hands it to wo: [T, H/W * Dh]."""
    T, H, Dh = out.shape
    return out[:, r * H // W:(r + 1) * H // W].reshape(T, H // W * Dh)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal on the bit patterns (signed zeros told apart, NaN-free)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert not torch.isnan(a).any() and not torch.isnan(b).any(), "NaN (an unwritten element?)"
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    return torch.equal(a.view(ints[a.dtype]), b.view(ints[b.dtype]))


def randn(*shape: int, dtype: torch.dtype, std: float = 1.0) -> torch.Tensor:
    """Random data from the device's default generator, which the `seed` fixture seeds (torch.manual_seed
    seeds every device's); drawn on the device (the GPU tier's expert weights are billions of numbers)."""
    return (torch.randn(*shape, device=DEVICE) * std).to(dtype)


# ---- dense row-parallel products (attention output, shared experts' down projection) ----

def check_dense_row_parallel(what: str, x_of: Callable[[int, int], torch.Tensor], x: torch.Tensor,
                             w: torch.Tensor, w_shard_of: Callable[[int, int], Shard], C: int,
                             both_forms: bool = True) -> None:
    """x [T, K] @ w [K, N] cut by rows of w over W = 2 and 4 ranks: rank r holds x_of(r, W) and
    w_shard_of(r, W).take(w) (as its module records it), sums its C/W chunks, and the ranks' subtrees meet
    in parallel.cross_rank_sum."""
    dtype = x.dtype
    ref = parallel.row_parallel_matmul(x, w, C, None)               # one device: the model's call
    partials = kernels.matmul_partials(x, w, C)                      # [C, T, N] fp32
    assert bits_equal(kernels.tree_sum(partials, dtype), ref), f"{what}: one device, partials + tree_sum"
    ref32 = kernels.matmul_chunk_sum(x, w, C, F32)                   # the same tree, unrounded
    assert bits_equal(kernels.tree_sum(partials, F32), ref32), f"{what}: one device, fp32"
    for W in (2, 4):
        n = C // W                                                   # leaves per rank
        xs = [x_of(r, W) for r in range(W)]
        ws = [w_shard_of(r, W).take(w) for r in range(W)]
        assert torch.equal(torch.cat(xs, 1), x) and torch.equal(torch.cat(ws, 0), w), f"{what}: shards x{W}"
        # by hand: each rank's chunks and subtree, as the all-gather delivers them, and the tree over them
        subtrees = []
        for r in range(W):
            mine = kernels.matmul_partials(xs[r], ws[r], n)
            assert bits_equal(mine, partials[r * n:(r + 1) * n]), f"{what}: rank {r}/{W}'s chunks"
            subtrees.append(kernels.matmul_chunk_sum(xs[r], ws[r], n, F32))   # row_parallel_matmul's, W > 1
            assert bits_equal(subtrees[r], kernels.tree_sum(mine, F32)), f"{what}: rank {r}/{W}'s subtree"
        gathered = torch.stack(subtrees)                             # [W, T, N]: all_gather's rank order
        assert bits_equal(kernels.tree_sum(gathered, dtype), ref), f"{what}: x{W} tree over the ranks"
        assert bits_equal(kernels.tree_sum(gathered, F32), ref32), f"{what}: x{W} tree over the ranks, fp32"
        # the model's code on every rank, the subtrees meeting in one all-gather (small sums) or in an
        # all-to-all, a tree per piece and an all-gather of the rounded pieces (large ones); in the model's
        # dtype, and on the same numbers in fp32, whose bits show a changed fp32 sum (bf16 rounds most
        # such changes away when the product has few elements)
        ranks = rank_views("tp", W)
        for dt in dict.fromkeys((dtype, F32)):
            ref_dt = ref if dt == dtype else parallel.row_parallel_matmul(x.to(dt), w.to(dt), C, None)
            xs_dt, ws_dt = [t.to(dt) for t in xs], [t.to(dt) for t in ws]
            for threshold in (ONE_ALL_GATHER, ALL_TO_ALL) if both_forms else (parallel.GATHER_BELOW_BYTES,):
                with _module_value(parallel, "GATHER_BELOW_BYTES", threshold):
                    outs = run_ranks(ranks, lambda v: parallel.row_parallel_matmul(xs_dt[v.rank], ws_dt[v.rank], C, v))
                for r, out in enumerate(outs):
                    assert bits_equal(out, ref_dt), \
                        f"{what}: rank {r} of {W}, {dt}, GATHER_BELOW_BYTES={threshold}"


# parallel.GATHER_BELOW_BYTES forcing each form of cross_rank_sum: one all-gather of the ranks' subtree sums,
# or an all-to-all of pieces, a tree per piece and an all-gather of the rounded pieces
ONE_ALL_GATHER, ALL_TO_ALL = 1 << 62, 0


@contextlib.contextmanager
def _module_value(module, name: str, value):
    """module.name set to value for a block: parallel.GATHER_BELOW_BYTES (0: every cross-rank sum takes the
    all-to-all form) and layer.EP_DEVICE_RUN_MAX (0: every step finds its rows on the host)."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def attention_output_case(cfg: moe.ModelConfig, T: int, N: int):
    """Attention.forward's wo product: the heads' outputs [T, H, Dh] and wo [H*Dh, N] (N = d_model, or
    narrow), with each rank's heads and the wo rows its Attention module records."""
    H, Dh, dtype = cfg.n_heads, cfg.head_dim, cfg.torch_dtype
    heads = randn(T, H, Dh, dtype=dtype)
    wo = randn(H * Dh, N, dtype=dtype, std=(H * Dh) ** -0.5)
    shard = lambda r, W: module_shards(lambda: Attention(cfg, 0, dtype, rank_views("tp", W).views[r]))["wo"]
    return heads, wo, shard


def check_attention_output(cfg: moe.ModelConfig, T: int, N: int, both_forms: bool = True) -> None:
    for W in (2, 4):
        Layout.check(rank_views("tp", W).views[0], cfg)   # the preset splits over W ranks (heads, chunks)
    heads, wo, shard = attention_output_case(cfg, T, N)
    check_dense_row_parallel("attention output", lambda r, W: head_block(heads, r, W),
                             heads.reshape(T, -1), wo, shard, cfg.reduce_chunks, both_forms)


def check_shared_down(cfg: moe.ModelConfig, T: int, N: int, both_forms: bool = True) -> None:
    """MoELayer._shared's down projection: act [T, Fs] (silu(gate) * up of the shared experts; rank r's
    columns r*Fs/W ..) @ w_shared_down [Fs, N]."""
    Fs, dtype, C = cfg.moe.n_shared_experts * cfg.moe.d_expert, cfg.torch_dtype, cfg.reduce_chunks
    act = randn(T, Fs, dtype=dtype)
    w = randn(Fs, N, dtype=dtype, std=Fs ** -0.5)
    shard = lambda r, W: module_shards(
        lambda: MoELayer(cfg.moe, N, dtype, C, rank_views("tp", W).views[r]))["w_shared_down"]
    check_dense_row_parallel("shared experts' down projection", lambda r, W: Shard(1, r, W).take(act), act, w,
                             shard, C, both_forms)


# ---- the experts' down projection (grouped GEMM), tp / ep / ep2xtp2 ----

def routed(T: int, E: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S distinct experts per token, sorted as MoELayer._experts sorts them: (order [T*S], offsets [E])."""
    experts = torch.rand(T, E, device=DEVICE).topk(S, dim=1).indices
    return kernels.expert_sort(experts.flatten(), E)


def check_expert_down(cfg: moe.ModelConfig, T: int, N: int) -> None:
    """act [A, F] (the assignments' SwiGLU outputs, sorted by expert) through each one's expert's
    w_down [E, F, N], as every rank of every layout computes it, against the one-device grouped GEMM."""
    E, S, Fd, C, dtype = cfg.moe.n_experts, cfg.moe.top_k, cfg.moe.d_expert, cfg.reduce_chunks, cfg.torch_dtype
    order, offsets = routed(T, E, S)
    A = order.shape[0]
    act = randn(A, Fd, dtype=dtype)
    w_down = randn(E, Fd, N, dtype=dtype, std=Fd ** -0.5)
    ref = parallel.row_parallel_grouped_matmul(act, w_down, offsets, C, None)   # one device: the model's call
    partials = kernels.grouped_matmul_partials(act, w_down, offsets, C)         # [C, A, N]
    assert bits_equal(kernels.tree_sum(partials, dtype), ref), "experts: one device, partials + tree_sum"
    ref32 = kernels.grouped_matmul_chunk_sum(act, w_down, offsets, C, F32)      # the same tree, unrounded
    assert bits_equal(kernels.tree_sum(partials, F32), ref32), "experts: one device, fp32"
    for experts, W in LAYOUTS:
        what = f"experts {experts}x{W}"
        ranks = rank_views(experts, W)
        shards = [module_shards(lambda: MoELayer(cfg.moe, N, dtype, C, v))["w_down"] for v in ranks.views]
        runs, outs = [], []
        for v, shard in zip(ranks.views, shards):
            ep, tp = v.expert_ep_layout, v.expert_tp_layout
            G, g = (ep.size, ep.rank) if ep else (1, 0)
            P, p = (tp.size, tp.rank) if tp else (1, 0)
            w_r = shard.take(w_down)                                 # [E/G, F/P, N]
            assert torch.equal(w_r, w_down[g * E // G:(g + 1) * E // G, p * Fd // P:(p + 1) * Fd // P]), what
            rows, offs = order, offsets
            lo, hi = 0, A
            if ep is not None:   # this rank's experts' run of the sorted rows (the host form, then the device form)
                rows, offs, counts = moe_layer._local_run(order, offsets, ep)
                lo = sum(counts[:g])
                hi = lo + counts[g]
                assert torch.equal(rows, order[lo:hi]), what
                rotated, offs_dev, run = moe_layer._local_run_on_device(order, offsets, ep)
                assert torch.equal(rotated[:hi - lo], rows) and torch.equal(offs_dev, offs), what
                assert torch.equal(run.mine(A), torch.arange(A, device=order.device) < hi - lo), what
            act_r = act[lo:hi, p * Fd // P:(p + 1) * Fd // P]        # its rows, its F columns
            if P == 1:   # whole experts: the rank's rows of the one-device grouped GEMM, from its experts alone
                out = parallel.row_parallel_grouped_matmul(act_r, w_r, offs, C, None)
                assert bits_equal(out, ref[lo:hi]), f"{what}: rank {v.rank}'s rows"
            else:        # its C/P chunks of F: their subtree, the tree of the one-device partials of those chunks
                n = C // P
                out = kernels.grouped_matmul_chunk_sum(act_r, w_r, offs, n, F32)   # row_parallel_grouped_matmul's
                assert bits_equal(out, kernels.tree_sum(partials[p * n:(p + 1) * n, lo:hi], F32)), \
                    f"{what}: rank {v.rank}'s subtree"
                if n > 1 and G == 1:   # the rank's own partials of its chunks (one leaf: the subtree is
                    # the partial; ep2xtp2's ranks run the same partials on their group's rows)
                    mine = kernels.grouped_matmul_partials(act_r, w_r, offs, n)
                    assert bits_equal(mine, partials[p * n:(p + 1) * n, lo:hi]), f"{what}: rank {v.rank}'s chunks"
            runs.append((g, p, lo, hi))
            outs.append(out)
        # each TP group's subtrees, in its rank order, through the tree; then the groups' runs in EP order
        G = max(g for g, *_ in runs) + 1
        P = max(p for _, p, *_ in runs) + 1
        pieces = []
        for g in range(G):
            mine = [i for i, run in enumerate(runs) if run[0] == g]           # ranks of group g, TP order
            lo, hi = runs[mine[0]][2:]
            if P == 1:
                pieces.append(outs[mine[0]])
                continue
            gathered = torch.stack([outs[i] for i in mine])                  # [P, rows, N]
            assert bits_equal(kernels.tree_sum(gathered, F32), ref32[lo:hi]), f"{what}: group {g}'s tree, fp32"
            pieces.append(kernels.tree_sum(gathered, dtype))
        assert bits_equal(torch.cat(pieces), ref), f"{what}: the runs gathered in rank order"


# ---- the whole MoE layer on every rank, the model's code ----

def fill_layer(layer: MoELayer, D: int, Fd: int) -> None:
    """Random weights, scaled so that activations stay O(1)."""
    std = {"w_router": 1.0, "w_gate_up": D ** -0.5, "w_down": Fd ** -0.5, "w_shared_gate_up": D ** -0.5,
           "w_shared_down": (Fd * max(layer.cfg.n_shared_experts, 1)) ** -0.5, "w_shared_gate": D ** -0.5}
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(randn(*p.shape, dtype=p.dtype, std=std[name]))


# (experts' layout, W, where an expert-parallel rank finds its run of rows: "device" below
# layer.EP_DEVICE_RUN_MAX assignments, decode-sized and capturable, or "host" above it, prefill-sized)
LAYER_RUNS = tuple((e, W, rows) for e, W in LAYOUTS for rows in (("device",) if e == "tp" else ("device", "host")))
# CPU tier (the interpreter runs a layer in about a second): each kind of sum and gather once, on 4 ranks
# (2 ranks: check_expert_down and check_dense_row_parallel, and the gloo tests of tests/moe/test_parallel.py)
# (tp x4: sums over 4 ranks; ep x4, rows on the host: gather_rows; ep2xtp2, rows on the device: sums over the
# TP pairs and DeviceRun.gather over the EP sub-groups)
CPU_LAYER_RUNS = (("tp", 4, "device"), ("ep", 4, "host"), ("ep2xtp2", 4, "device"))


def check_moe_layer(cfg: moe.ModelConfig, T: int, D: int, runs=LAYER_RUNS, dtype: Optional[torch.dtype] = None) -> None:
    """MoELayer.forward (router, experts, shared experts) of width D on every rank of each layout in
    `runs`, each rank's layer holding the blocks of the one-device layer's weights its shards name (as
    parallel.shard_model copies them), against the one-device layer: the same y bitwise on every rank.
    dtype: the weights' and activations' (default: the preset's)."""
    dtype = dtype or cfg.torch_dtype
    single = random_layer(cfg, D, dtype)
    x = randn(T, D, dtype=dtype)
    seq_ids = torch.zeros(T, dtype=torch.long, device=DEVICE)
    ref, routing = single(x, seq_ids)
    built: dict = {}
    for experts, W, ep_rows in runs:
        if (experts, W) not in built:
            ranks = rank_views(experts, W)
            built[experts, W] = ranks, sharded_layers(single, ranks)
        ranks, layers = built[experts, W]
        with _module_value(moe_layer, "EP_DEVICE_RUN_MAX", EP_DEVICE_RUN_MAX if ep_rows == "device" else 0):
            outs = run_ranks(ranks, lambda v: layers[v.rank](x, seq_ids))
        for r, (y, rt) in enumerate(outs):
            assert torch.equal(rt.experts, routing.experts), f"{experts}x{W} rank {r}: routing"
            assert bits_equal(y, ref), f"MoE layer {experts}x{W}, rank {r}, rows on the {ep_rows}"


EP_DEVICE_RUN_MAX = moe_layer.EP_DEVICE_RUN_MAX   # (the module's value, before any test changes it)


def random_layer(cfg: moe.ModelConfig, D: int, dtype: Optional[torch.dtype] = None) -> MoELayer:
    """A one-device MoE layer of the preset's experts at width D, random weights (default: the preset's dtype)."""
    with torch.device(DEVICE):
        single = MoELayer(cfg.moe, D, dtype or cfg.torch_dtype, cfg.reduce_chunks)
    fill_layer(single, D, cfg.moe.d_expert)
    return single


def sharded_layers(single: MoELayer, ranks: Ranks) -> list[MoELayer]:
    """Each rank's layer, holding the blocks of `single`'s weights that its shards name (the copy
    parallel.shard_model makes)."""
    full = dict(single.named_parameters())
    layers = []
    for v in ranks.views:
        with torch.device(DEVICE):
            layer = MoELayer(single.cfg, single.d_model, single.w_down.dtype, single.reduce_chunks, v)
        shards = shards_of(layer)
        with torch.no_grad():
            for name, p in layer.named_parameters():
                p.copy_(shards[name].take(full[name]) if name in shards else full[name])
        layers.append(layer)
    return layers


# ---- CPU tier: real K widths and chunk counts, few rows, narrow N ----

@pytest.fixture
def batch_invariant():
    with kernels.use_backend("batch_invariant"):
        yield


@pytest.mark.parametrize("name", PRESETS)
def test_attention_output_projection(seed, batch_invariant, emulated_collectives, name):
    cfg = preset(name)
    check_attention_output(cfg, CPU_TOKENS, NARROW)


def test_shared_expert_down_projection(seed, batch_invariant, emulated_collectives):
    cfg = preset("qwen2_moe")
    assert cfg.moe.n_shared_experts * cfg.moe.d_expert == 5632
    check_shared_down(cfg, CPU_TOKENS, NARROW)


@pytest.mark.parametrize("name", PRESETS)
def test_expert_down_projection(seed, batch_invariant, interpreter_fits, name):
    check_expert_down(preset(name), CPU_TOKENS, NARROW)


@pytest.mark.parametrize("name", PRESETS)
def test_moe_layer_on_every_layout(seed, batch_invariant, emulated_collectives, interpreter_fits, name):
    """The whole layer (qwen2_moe: with its gated shared experts), d_model narrowed to NARROW, in fp32:
    at 4 tokens x NARROW columns a bf16 output would round most changes of an fp32 sum away (the GPU
    tier runs the preset's bf16 at full width)."""
    check_moe_layer(preset(name), 4, NARROW, CPU_LAYER_RUNS, F32)


def test_controls_break_the_bits(seed, batch_invariant, emulated_collectives, interpreter_fits):
    """The checks above can fail: at qwen2_moe's widths (attention K = 2048, shared K = 5632) and large's
    experts (K = 768), compared in fp32 (in bf16 a changed fp32 sum is mostly rounded away at these few
    elements), each of these changes the bits of the cross-rank sum:
    - another chunk count (the ranks' subtrees over 2C or C/2 leaves);
    - another tree: the subtrees delivered in another order (0, 2, 1, 3), or added left to right;
      (the reversed order gives the same bits: each node's two sides just swap, and fp32 addition commutes);
    - on 2 ranks, a rank's K shard summed as one leaf instead of its C/2;
    - in the threads: a group delivering its members' sums in another order (the model's
      cross_rank_sum, both forms), and an expert-parallel layer whose runs come back in another order."""
    cfg = preset("qwen2_moe")
    C, dtype, T = cfg.reduce_chunks, cfg.torch_dtype, CPU_TOKENS
    heads, wo, _ = attention_output_case(cfg, T, NARROW)
    x = heads.reshape(T, -1)
    act = randn(T, 5632, dtype=dtype)
    w_sh = randn(5632, NARROW, dtype=dtype, std=5632 ** -0.5)
    E, S, Fd = (lambda m: (m.n_experts, m.top_k, m.d_expert))(preset("large").moe)   # (the fastest grouped GEMM)
    order, offsets = routed(T, E, S)
    act_e = randn(order.shape[0], Fd, dtype=dtype)
    w_down = randn(E, Fd, NARROW, dtype=dtype, std=Fd ** -0.5)

    def dense(xx, ww, W, chunks):   # the ranks' fp32 subtrees of `chunks` leaves each
        return torch.stack([kernels.matmul_chunk_sum(Shard(1, r, W).take(xx), Shard(0, r, W).take(ww), chunks, F32)
                            for r in range(W)])

    def grouped(W, chunks):
        return torch.stack([kernels.grouped_matmul_chunk_sum(Shard(1, r, W).take(act_e), Shard(1, r, W).take(w_down),
                                                             offsets, chunks, F32) for r in range(W)])

    cases = [("attention output", kernels.matmul_chunk_sum(x, wo, C, F32), lambda W, c: dense(x, wo, W, c)),
             ("shared down", kernels.matmul_chunk_sum(act, w_sh, C, F32), lambda W, c: dense(act, w_sh, W, c)),
             ("experts' down", kernels.grouped_matmul_chunk_sum(act_e, w_down, offsets, C, F32), grouped)]
    for what, ref32, subtrees_of in cases:
        four = subtrees_of(4, C // 4)
        assert bits_equal(kernels.tree_sum(four, F32), ref32), what           # the right tree, as above
        assert not bits_equal(kernels.tree_sum(subtrees_of(4, 2 * C // 4), F32), ref32), f"{what}: 2C leaves"
        assert not bits_equal(kernels.tree_sum(four[[0, 2, 1, 3]], F32), ref32), f"{what}: leaves 0, 2, 1, 3"
        assert bits_equal(kernels.tree_sum(four.flip(0), F32), ref32), f"{what}: leaves 3, 2, 1, 0"
        assert not bits_equal(((four[0] + four[1]) + four[2]) + four[3], ref32), f"{what}: left to right"
        assert bits_equal(kernels.tree_sum(subtrees_of(2, C // 2), F32), ref32), f"{what}: 2 ranks"
        assert not bits_equal(kernels.tree_sum(subtrees_of(2, 1), F32), ref32), f"{what}: 2 ranks, 1 leaf each"
        # the model's cross_rank_sum on 4 threads whose group delivers in the order 0, 2, 1, 3
        for threshold in (ONE_ALL_GATHER, ALL_TO_ALL):
            with _module_value(parallel, "GATHER_BELOW_BYTES", threshold):
                for deliver, same in ((None, True), ([0, 2, 1, 3], False)):
                    outs = run_ranks(rank_views("tp", 4, deliver),
                                     lambda v: parallel.cross_rank_sum(four[v.rank], v, F32))
                    assert all(bits_equal(o, ref32) == same for o in outs), (what, threshold, deliver)
    # expert parallelism (`large`, whose layer the interpreter runs fastest): the runs gathered in another
    # order are other rows (rows found on the host: gather_rows; on the device: DeviceRun.gather)
    single = random_layer(preset("large"), NARROW)
    xx = randn(T, NARROW, dtype=dtype)
    seq_ids = torch.zeros(T, dtype=torch.long, device=DEVICE)
    ref = single(xx, seq_ids)[0]
    ranks = rank_views("ep", 4, deliver=[1, 0, 3, 2])
    layers = sharded_layers(single, ranks)
    for max_rows in (EP_DEVICE_RUN_MAX, 0):
        with _module_value(moe_layer, "EP_DEVICE_RUN_MAX", max_rows):
            outs = run_ranks(ranks, lambda v: layers[v.rank](xx, seq_ids)[0])
        assert not any(bits_equal(y, ref) for y in outs), max_rows


# ---- GPU tier: the full widths, realistic row counts ----

@pytest.mark.gpu
@pytest.mark.parametrize("name", PRESETS)
def test_gpu_full_widths(seed, batch_invariant, emulated_collectives, name):
    """All three row-parallel products and the whole MoE layer at the preset's d_model, with T = 1, 16
    and 512 tokens (at 512 the model's sums pass GATHER_BELOW_BYTES, e.g. wide's 512 x 4096 fp32 = 8 MiB,
    and take the all-to-all form; the products' checks force each form for every T)."""
    cfg = preset(name)
    D = cfg.d_model
    for T in GPU_TOKENS:
        check_attention_output(cfg, T, D)
        if cfg.moe.n_shared_experts:
            check_shared_down(cfg, T, D)
        check_expert_down(cfg, T, D)
        check_moe_layer(cfg, T, D)
