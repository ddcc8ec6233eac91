"""Stock attention (detmoe/kernels/stock_attention.py) against a per-sequence float64 reference, on ragged
batches that mix prefill chunks and decode tokens over scattered slots.

On the CPU flex runs eagerly, which applies mask_mod to every key and ignores the block lists; so the
block lists are checked on their own: the keys they admit (partial blocks through mask_mod, full blocks
whole, as flex's compiled kernels read them) must be exactly the keys each query may see. The GPU tests
run the compiled kernels, inside a CUDA graph too."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from detmoe.kernels import stock_attention as sa
from detmoe.kernels.torch_backend import TorchBackend
from tests.kernels.conftest import DEVICE, TOL, randn, rel_err

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# (S, L, kv_block, sequences as (n_queries, kv_len, slot)); the block sizes do not divide L or the lengths
CASES = {
    "mixed": (6, 37, 8, [(7, 20, 3), (1, 37, 0), (12, 12, 5), (1, 1, 2), (5, 36, 1)]),
    "decode_near_capacity": (5, 37, 8, [(1, 37, 4), (1, 36, 0), (1, 29, 2)]),
    "long_prefill_chunk": (3, 45, 8, [(30, 43, 2)]),
    "empty_sequence": (4, 18, 4, [(3, 9, 1), (0, 4, 0), (2, 2, 3)]),
    "shared_slot": (6, 20, 16, [(1, 1, 5), (1, 1, 5), (4, 10, 0)]),   # decode graphs' padding sequences
    "same_shapes": (6, 37, 8, [(9, 9, 1), (1, 20, 0), (4, 30, 2), (9, 9, 4), (4, 30, 5)]),  # split groups them
}


def _batch(gen, case, H=4, Hkv=2, Dh=16, dtype=torch.float32):
    S, L, kv_block, seqs = CASES[case]
    k, v = randn(gen, S, L, Hkv, Dh, dtype=dtype), randn(gen, S, L, Hkv, Dh, dtype=dtype)
    q = randn(gen, sum(n for n, _, _ in seqs), H, Dh, dtype=dtype)
    cu = torch.tensor([0] + [n for n, _, _ in seqs], device=DEVICE).cumsum(0).to(torch.int32)
    kv = torch.tensor([n for _, n, _ in seqs], device=DEVICE, dtype=torch.int32)
    slots = torch.tensor([s for _, _, s in seqs], device=DEVICE, dtype=torch.int32)
    return q, k, v, (cu, kv, slots), seqs, kv_block


def _reference(q, k, v, seqs, scale):
    """Each sequence alone, float64: its n queries at positions kv_len-n.., causal over its slot."""
    G = q.shape[1] // k.shape[2]
    outs, row = [], 0
    for n, kv_len, slot in seqs:
        qs = q[row:row + n].double().transpose(0, 1)                               # [H, n, Dh]
        ks = k[slot, :kv_len].double().transpose(0, 1).repeat_interleave(G, 0)      # [H, kv_len, Dh]
        vs = v[slot, :kv_len].double().transpose(0, 1).repeat_interleave(G, 0)
        scores = qs @ ks.transpose(1, 2) * scale
        pos = torch.arange(kv_len - n, kv_len, device=q.device)
        scores = scores.masked_fill(torch.arange(kv_len, device=q.device)[None, :] > pos[:, None], float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
        row += n
    return torch.cat(outs)


@pytest.mark.parametrize("chunk", [None, 1, 4, 16, 128])
@pytest.mark.parametrize("case", list(CASES))
def test_flex_eager_matches_reference(gen, case, chunk):
    q, k, v, meta, seqs, kv_block = _batch(gen, case)
    out = sa.flex_paged_attention(q, k, v, *meta, 0.3, compiled=False, chunk=chunk, kv_block=kv_block)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, _reference(q, k, v, seqs, 0.3)) < TOL[torch.float32]


def _small_windows(monkeypatch, k, slots_per_window):
    """Make flex's offset limit so small that the cache k [S, L, Hkv, Dh] is read in windows of
    `slots_per_window` slots; returns the windows. (Windows are sized in keys rounded up to 128-key
    blocks; with these short slots, whole keys.)"""
    S, L, Hkv, Dh = k.shape
    monkeypatch.setattr(sa, "KV_BLOCK", 1)
    monkeypatch.setattr(sa, "FLEX_MAX_ELEMENTS", slots_per_window * L * Hkv * Dh + 1)
    windows = sa.flex_windows(k.shape)
    assert all(w.n_slots == min(slots_per_window, S) for w in windows)
    return windows


@pytest.mark.parametrize("per_window", [None, 2, 4])
@pytest.mark.parametrize("chunk", [None, 1, 4, 16, 128])
@pytest.mark.parametrize("case", list(CASES))
def test_block_lists_admit_exactly_the_visible_keys(gen, case, chunk, per_window, monkeypatch):
    """Partial blocks filtered by mask_mod plus whole full blocks == the keys each real row may see;
    lists in range, ascending, disjoint; padding chunks list nothing. Read in windows of slots (a cache
    past flex's int32 offsets), each window's plan admits, at keys counted from its first slot, exactly
    what the rows of the sequences it answers may see, and nothing for the others."""
    q, k, v, meta, seqs, kv_block = _batch(gen, case)
    S, L = k.shape[:2]
    windows = _small_windows(monkeypatch, k, per_window) if per_window else [sa.FlexWindow(0, 0, S, S)]
    answered = torch.zeros(S, dtype=torch.long)
    for w in windows:
        answered[w.lo:w.hi] += 1
        plan = sa.flex_plan(*meta, q.shape[0], S, L, group=2, chunk=chunk, kv_block=kv_block, window=w)
        _check_block_lists(plan, seqs, w, L, kv_block, q.device)
    assert (answered == 1).all()


def _check_block_lists(plan, seqs, w, L, kv_block, device):
    bm, C, QC = plan.block_mask, plan.n_chunks, plan.chunk
    n_keys = w.n_slots * L
    n_blocks = -(-n_keys // kv_block)
    keys = torch.arange(n_keys, device=device)
    rows = torch.arange(QC, device=device)
    mask = plan.block_mask.mask_mod(torch.arange(C, device=device)[:, None, None], 0, rows[None, :, None],
                                    keys[None, None, :])                          # [C, QC, n_keys]

    def listed(num, idx):
        if num is None:
            return torch.zeros(C, n_blocks, dtype=torch.bool, device=device)
        num, idx = num.view(C).long(), idx.view(C, -1).long()
        used = torch.arange(idx.shape[1], device=device)[None, :] < num[:, None]
        assert (idx[used] >= 0).all() and (idx[used] < n_blocks).all()
        assert all((row[:n].diff() > 0).all() for row, n in zip(idx, num.tolist()))   # ascending, no repeats
        out = torch.zeros(C, n_blocks, dtype=torch.bool, device=device)
        out[torch.arange(C, device=device)[:, None].expand_as(idx)[used], idx[used]] = True
        return out

    partial, full = listed(bm.kv_num_blocks, bm.kv_indices), listed(bm.full_kv_num_blocks, bm.full_kv_indices)
    assert not (partial & full).any()
    if QC < 128:
        assert bm.full_kv_num_blocks is None      # the decoding kernel's splits need partial lists only
    in_block = lambda blocks: blocks.repeat_interleave(kv_block, 1)[:, None, :n_keys]
    admitted = (in_block(partial) & mask) | in_block(full)                        # [C, QC, n_keys]

    visible = torch.zeros_like(admitted)
    real = torch.zeros(C, QC, dtype=torch.bool, device=device)
    taken = set()
    row = 0
    for n, kv_len, slot in seqs:
        for i in range(n):
            c, r = int(plan.row_chunk[row + i]), int(plan.row_offset[row + i])
            assert (c, r) not in taken, "two query rows share a chunk row"
            taken.add((c, r))
            if w.lo <= slot < w.hi:
                real[c, r] = True
                first = (slot - w.base) * L
                visible[c, r, first: first + kv_len - n + i + 1] = True
        row += n
    assert torch.equal(admitted[real], visible[real])
    assert torch.equal(plan.n_real.long(), real.sum(1))
    assert not (partial | full)[plan.n_real == 0].any()


@pytest.mark.parametrize("per_window", [1, 2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_flex_in_windows_of_slots_matches_reference(gen, case, per_window, monkeypatch):
    """A cache past flex's int32 offsets is read in windows of slots, one flex call each; every row
    takes its own window's output."""
    q, k, v, meta, seqs, kv_block = _batch(gen, case)
    windows = _small_windows(monkeypatch, k, per_window)
    assert len(windows) == -(-k.shape[0] // per_window) and sa.flex_fits(k)
    out = sa.flex_paged_attention(q, k, v, *meta, 0.3, compiled=False, kv_block=kv_block)
    assert rel_err(out, _reference(q, k, v, seqs, 0.3)) < TOL[torch.float32]


def test_flex_windows_cover_every_slot_once_in_windows_that_fit(monkeypatch):
    for S, L, limit in [(1, 5, 10 ** 9), (7, 37, 3000), (10, 128, 2 ** 15 + 1), (9, 300, 4 * 384 * 2 * 8),
                        (257, 8193, 2 ** 31), (256, 8192, 2 ** 31), (255, 8192, 2 ** 31)]:
        monkeypatch.setattr(sa, "FLEX_MAX_ELEMENTS", limit)
        Hkv, Dh = (8, 128) if L >= 8192 else (2, 8)
        fits = lambda n: -(-n * L // sa.KV_BLOCK) * sa.KV_BLOCK * Hkv * Dh < limit
        windows = sa.flex_windows(torch.Size((S, L, Hkv, Dh)))
        n = windows[0].n_slots
        assert fits(n) and (n == S or not fits(n + 1)), "windows as long as fit"
        assert all(w.n_slots == n and 0 <= w.base <= w.lo < w.hi <= w.base + n <= S for w in windows)
        assert [s for w in windows for s in range(w.lo, w.hi)] == list(range(S))
    assert sa.flex_windows(torch.Size((255, 8192, 8, 128))) == [sa.FlexWindow(0, 0, 255, 255)]
    assert len(sa.flex_windows(torch.Size((257, 8193, 8, 128)))) == 2
    assert sa.flex_windows(torch.Size((2, 2 ** 21, 8, 128))) == []     # one slot of 2**31 elements


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_gather_and_cpu_backend_match_reference(gen, case):
    q, k, v, meta, seqs, _ = _batch(gen, case)
    ref = _reference(q, k, v, seqs, 0.3)
    assert rel_err(sa.sdpa_gather_attention(q, k, v, *meta, 0.3), ref) < TOL[torch.float32]
    assert rel_err(TorchBackend().attention(q, k, v, *meta, 0.3), ref) < TOL[torch.float32]


@pytest.mark.parametrize("case", list(CASES))
def test_split_matches_reference(gen, case):
    """Decode rows through flex (eager here), prefill sequences through SDPA, one call per shape: fresh
    prompts (n == kv_len), later chunks (n < kv_len), empty sequences, two sequences on one slot,
    sequences of one shape apart in the batch (same_shapes)."""
    q, k, v, meta, seqs, _ = _batch(gen, case)
    out = sa.stock_attention(q, k, v, *meta, 0.3, kernel="split")
    assert out.shape == q.shape and rel_err(out, _reference(q, k, v, seqs, 0.3)) < TOL[torch.float32]


def test_split_plan_is_read_once_per_step(gen, monkeypatch):
    """The layers of a step share one split plan (one check and one host read); new or rewritten index
    tensors get a new one."""
    q, k, v, (cu, kv, slots), seqs, _ = _batch(gen, "mixed")
    checks = []
    real = sa.check_attention_indices
    monkeypatch.setattr(sa, "check_attention_indices", lambda *a: checks.append(1) or real(*a))
    monkeypatch.setattr(sa, "_last_split", None)
    first = sa.split_attention(q, k, v, cu, kv, slots, 0.3)
    assert torch.equal(first, sa.split_attention(q, k, v, cu, kv, slots, 0.3)) and len(checks) == 1
    kv.add_(0)
    sa.split_attention(q, k, v, cu, kv, slots, 0.3)
    assert len(checks) == 2
    with pytest.raises(ValueError, match="kv_lens"):
        sa.split_attention(q, k, v, cu, kv - 2, slots, 0.3)


def test_chunk_count_bounds_every_split_of_the_rows(gen):
    for _ in range(300):
        B = int(torch.randint(1, 40, (), generator=gen))
        q_lens = torch.randint(0, 300, (B,), generator=gen) * (torch.rand(B, generator=gen) < 0.7)
        Tq = int(q_lens.sum())
        for QC in sa.CHUNK_LENS:
            need = int(((q_lens + QC - 1) // QC).sum())
            bound = (Tq + B * (QC - 1)) // QC
            C = sa.n_chunks_for(Tq, B, QC)
            assert need <= bound <= C < 2 * max(bound, 1) and C & (C - 1) == 0
        assert sa.chunk_len_for(Tq, B) in sa.CHUNK_LENS


class _SyncCounter(TorchDispatchMode):
    """Ops whose result the host must wait for (tests/moe/test_syncs.py has the full story)."""
    SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.masked_select.default}

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default) and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if func in self.SYNCS or bool_index:
            self.ops.append(str(func))
        return func(*args, **kwargs)


def test_flex_plan_reads_nothing_back(gen):
    """Building the plan and placing the queries in chunks: no op the host must wait for."""
    q, k, v, (cu, kv, slots), _, kv_block = _batch(gen, "mixed")
    with _SyncCounter() as counter:
        plan = sa.flex_plan(cu, kv, slots, q.shape[0], k.shape[0], k.shape[1], group=2, kv_block=kv_block)
        qc = q.new_zeros(plan.n_chunks, plan.chunk, *q.shape[1:])
        qc[plan.row_chunk, plan.row_offset] = q
        qc[plan.row_chunk, plan.row_offset]
    assert counter.ops == []


def test_default_kernel_and_bad_arguments():
    q, k = torch.randn(3, 4, 8), torch.randn(2, 8, 2, 8)
    meta = (torch.tensor([0, 2, 3]), torch.tensor([3, 5]), torch.tensor([0, 1]))
    assert sa.kernel_for(q, k, k) == "sdpa_gather"           # the CPU
    with pytest.raises(ValueError, match="kernel"):
        sa.stock_attention(q, k, k, *meta, 1.0, kernel="flash")
    with pytest.raises(ValueError, match="Hkv=3"):
        sa.stock_attention(torch.randn(3, 4, 8), torch.randn(2, 8, 3, 8), torch.randn(2, 8, 3, 8), *meta, 1.0)
    assert sa.stock_attention(q[:0], k, k, torch.tensor([0, 0, 0]), torch.tensor([0, 0]), meta[2],
                              1.0).shape == (0, 4, 8)
    with pytest.raises(ValueError, match="forward-only"):
        sa.stock_attention(q.requires_grad_(), k, k, *meta, 1.0, kernel="flex")


def test_flex_fits_views_of_slots_end_to_end_with_a_slot_within_int32_offsets():
    cache = torch.empty(4, 16, 2, 8)
    assert sa.flex_fits(cache)
    assert not sa.flex_fits(cache[:, :15])                     # slots no longer end to end
    assert not sa.flex_fits(cache.transpose(1, 2).contiguous().transpose(1, 2))
    assert sa.flex_fits(torch.empty(255, 8192, 8, 128, device="meta"))           # under 2**31 elements
    assert sa.flex_fits(torch.empty(256, 8192, 8, 128, device="meta"))          # 2**31: in two windows
    assert not sa.flex_fits(torch.empty(2, 2 ** 21, 8, 128, device="meta"))     # one slot of 2**31


def test_autograd_reaches_queries_and_cache(gen):
    """Training runs the torch backend with autograd (detmoe/moe/model.py forward_train): gradients flow."""
    q, k, v, meta, seqs, _ = _batch(gen, "mixed")
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    assert sa.kernel_for(q, k, v) == "sdpa_gather"
    TorchBackend().attention(q, k, v, *meta, 0.3).square().sum().backward()
    ref_q, ref_k, ref_v = (t.detach().double().requires_grad_() for t in (q, k, v))
    _reference(ref_q, ref_k, ref_v, seqs, 0.3).square().sum().backward()
    for got, want in ((q, ref_q), (k, ref_k), (v, ref_v)):
        assert rel_err(got.grad, want.grad) < 1e-4


# ---------------------------------------------------------------------------------------------------
# GPU: the compiled kernels
# ---------------------------------------------------------------------------------------------------

GPU_BATCHES = {   # (S, L, sequences); L = 1000 is no multiple of the 128-key blocks
    "prefill_mixed": (8, 1000, [(300, 700, 5), (1, 1000, 0), (1, 37, 3), (64, 999, 6), (1, 129, 1)]),
    "decode": (8, 1000, [(1, 1000, 7), (1, 1, 2), (1, 513, 0), (1, 999, 4), (1, 128, 6)]),
    "small_chunks": (8, 1000, [(3, 200, 1), (1, 1000, 0), (9, 640, 7), (2, 2, 3)]),
    "same_shapes": (8, 1000, [(300, 300, 1), (1, 1000, 0), (64, 999, 6), (300, 300, 5), (64, 999, 2)]),
}


def _gpu_batch(gen, name, H=32, Hkv=8, Dh=128, dtype=torch.bfloat16, L=None):
    S, L0, seqs = GPU_BATCHES[name]
    L = L or L0
    k, v = randn(gen, S, L, Hkv, Dh, dtype=dtype), randn(gen, S, L, Hkv, Dh, dtype=dtype)
    q = randn(gen, sum(n for n, _, _ in seqs), H, Dh, dtype=dtype)
    cu = torch.tensor([0] + [n for n, _, _ in seqs], device=DEVICE).cumsum(0).to(torch.int32)
    kv = torch.tensor([n for _, n, _ in seqs], device=DEVICE, dtype=torch.int32)
    slots = torch.tensor([s for _, _, s in seqs], device=DEVICE, dtype=torch.int32)
    return q, k, v, (cu, kv, slots), seqs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(GPU_BATCHES))
def test_gpu_flex_compiled_matches_reference(gen, name, dtype):
    q, k, v, meta, seqs = _gpu_batch(gen, name, dtype=dtype)
    assert sa.kernel_for(q, k, v) == "flex"
    # by default: flex for a decode step (one query per sequence), split for the others
    B = meta[1].shape[0]
    assert sa.kernel_for(q, k, v, n_seqs=B) == ("flex" if q.shape[0] == B else "split")
    scale = q.shape[-1] ** -0.5
    ref = _reference(q, k, v, seqs, scale)
    for kernel in ("flex", "split"):
        assert rel_err(sa.stock_attention(q, k, v, *meta, scale, kernel=kernel), ref) < TOL[dtype], kernel


@pytest.mark.gpu
def test_gpu_split_refuses_capture(gen):
    """split's plan is the host's copy of the step's lengths, which a replay would not update: a capture
    that forces it is refused, even with a plan built eagerly for the same index tensors."""
    q, k, v, meta, _ = _gpu_batch(gen, "prefill_mixed")
    sa.stock_attention(q, k, v, *meta, 0.1, kernel="split")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="capture"):
        with torch.cuda.graph(graph):
            sa.stock_attention(q, k, v, *meta, 0.1, kernel="split")


def _capture_without_sync(run):
    """run() once more with host syncs made errors, then captured: (the graph, its static output)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


@pytest.mark.gpu
def test_gpu_flex_captured_without_sync(gen):
    """The default path in a CUDA graph: no sync once compiled, and a replay with new index values in
    the same buffers gives what an eager call with those values gives."""
    q, k, v, (cu, kv, slots), _ = _gpu_batch(gen, "decode")
    scale = q.shape[-1] ** -0.5
    run = lambda: sa.stock_attention(q, k, v, cu, kv, slots, scale)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()                                   # compiles
    torch.cuda.current_stream().wait_stream(side)
    graph, out = _capture_without_sync(run)
    kv.copy_(torch.tensor([17, 1000, 3, 640, 129], device=DEVICE, dtype=torch.int32))
    slots.copy_(torch.tensor([0, 7, 5, 2, 6], device=DEVICE, dtype=torch.int32))
    q.copy_(randn(gen, *q.shape, dtype=q.dtype))
    graph.replay()
    assert torch.equal(out, run())


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_BATCHES))
def test_gpu_flex_in_windows_matches_reference_and_captures(gen, name, monkeypatch):
    """A cache read in windows of 3 slots (as one past 2**31 elements is), compiled: right rows, and a
    decode step captured without a sync replays what an eager call gives."""
    q, k, v, meta, seqs = _gpu_batch(gen, name)
    S, L, Hkv, Dh = k.shape
    monkeypatch.setattr(sa, "FLEX_MAX_ELEMENTS", -(-3 * L // sa.KV_BLOCK) * sa.KV_BLOCK * Hkv * Dh + 1)
    assert [w.n_slots for w in sa.flex_windows(k.shape)] == [3, 3, 3]
    scale = q.shape[-1] ** -0.5
    run = lambda: sa.stock_attention(q, k, v, *meta, scale, kernel="flex")
    assert rel_err(run(), _reference(q, k, v, seqs, scale)) < TOL[torch.bfloat16]
    if name != "decode":
        return
    graph, out = _capture_without_sync(run)
    meta[2].copy_(torch.tensor([6, 0, 3, 4, 7], device=DEVICE, dtype=torch.int32))   # other windows
    graph.replay()
    assert torch.equal(out, run())


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_BATCHES))
def test_gpu_varlen_matches_reference(gen, name):
    q, k, v, meta, seqs = _gpu_batch(gen, name, L=4 * sa.VARLEN_PAGE)   # pages need L = a multiple of them
    if not sa.varlen_available(k):
        pytest.skip("this torch has no paged varlen_attn")
    scale = q.shape[-1] ** -0.5
    out = sa.stock_attention(q, k, v, *meta, scale, kernel="varlen")
    assert rel_err(out, _reference(q, k, v, seqs, scale)) < TOL[torch.bfloat16]


def test_flex_plan_is_built_once_per_step_and_rebuilt_when_the_indices_change(gen, monkeypatch):
    """The layers of one step share one plan (the same index tensors, unchanged); new tensors, or the same
    tensors written in place, get a new one, and its output is right."""
    q, k, v, (cu, kv, slots), seqs, _ = _batch(gen, list(CASES)[0])
    built = []
    real = sa.flex_plan
    monkeypatch.setattr(sa, "flex_plan", lambda *a, **kw: built.append(1) or real(*a, **kw))
    monkeypatch.setattr(sa, "_last_plan", None)
    first = sa.flex_paged_attention(q, k, v, cu, kv, slots, 0.3, compiled=False)
    again = sa.flex_paged_attention(q, k, v, cu, kv, slots, 0.3, compiled=False)
    assert len(built) == 1 and torch.equal(first, again)
    torch.testing.assert_close(first, _reference(q, k, v, seqs, 0.3).float(), rtol=1e-4, atol=1e-4)
    sa.flex_paged_attention(q, k, v, cu.clone(), kv, slots, 0.3, compiled=False)
    assert len(built) == 2
    kv_other = kv.clone()
    sa.flex_paged_attention(q, k, v, cu, kv_other, slots, 0.3, compiled=False)
    kv_other.sub_(0)                      # an in-place write bumps the version: rebuilt
    sa.flex_paged_attention(q, k, v, cu, kv_other, slots, 0.3, compiled=False)
    assert len(built) == 4


def test_model_step_with_split_matches_the_default(make_model, gen, monkeypatch):
    """The stock model's mixed step with split forced (decode rows, fresh prompts of one shape, a chunk
    after cached context) against the same step on the CPU default, sdpa_gather: the model's cache, slots
    and positions reach split as they reach the others."""
    from detmoe import kernels
    from detmoe.moe.model import cu_seqlens_of
    model = make_model()
    V = model.cfg.vocab_size
    tok = lambda n: torch.randint(0, V, (n,), generator=gen).tolist()
    first = [tok(6), tok(9), tok(4)]                                  # slots 0-2: earlier steps
    step = [tok(1), tok(7), tok(7), tok(1), tok(7)]                   # decode, chunk, fresh, decode, fresh
    slots_step = torch.tensor([0, 1, 3, 2, 4])
    logits = {}
    with kernels.use_backend("torch"):
        for kernel in (None, "split"):
            monkeypatch.setattr(sa, "DEFAULT", kernel)
            cache = model.new_cache(5, 32)
            model(*cu_seqlens_of(first), cache, torch.tensor([0, 1, 2]))
            logits[kernel] = model(*cu_seqlens_of(step), cache, slots_step)[0]
    torch.testing.assert_close(logits["split"], logits[None], rtol=1e-4, atol=1e-4)
