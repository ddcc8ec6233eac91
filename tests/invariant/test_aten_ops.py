"""The aten overrides of `invariant_mode()` (detmoe/invariant/aten_ops.py), called through PyTorch's own API
on fresh random data: inside the mode a row's result has the same bits whatever else is in the batch (its
batch size, its position, its co-rows), an element of a CPU transcendental op has the same bits whatever the
tensor's length, offset or strides, index_add adds in source order, and each result is close to PyTorch's
outside the mode (equal where the op is exact: integer sums, topk's values)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import detmoe
from detmoe.invariant import aten_ops, fallback
from detmoe.invariant.attention import allowed_from_mask
from tests.invariant.conftest import (additive, assert_rows_invariant, assert_same_bits, pad_batch, padding_mask,
                                      random_subsets, real_positions)

DTYPES = [torch.float32, torch.bfloat16]
# against PyTorch's kernels outside the mode: one rounding of the output apart, and the order of K sums
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


def assert_close(got: torch.Tensor, want: torch.Tensor, **tol) -> None:
    __tracebackhide__ = True
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), **(tol or TOL[got.dtype]))


# --- products --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_mm_and_linear_rows_have_the_same_bits_in_any_batch(seed, dtype):
    M, K, N = 300, 80, 48                          # M beyond one 256-row tile of the interpreted matmul
    x, w, bias = randn(M, K, dtype=dtype), randn(N, K, dtype=dtype), randn(N, dtype=dtype)
    cases = {
        "mm": (lambda x, w: torch.mm(x, w.t().contiguous()), (x, w)),
        "mm of a transposed view": (lambda x, w: torch.mm(x, w.t()), (x, w)),
        "linear": (lambda x, w: F.linear(x, w), (x, w)),
        "linear with bias (addmm)": (lambda x, w, b: F.linear(x, w, b), (x, w, bias)),
        "addmm beta/alpha": (lambda x, w, b: torch.addmm(b, x, w.t(), beta=0.5, alpha=2.0), (x, w, bias)),
    }
    with detmoe.invariant_mode(strict=True):
        got = {name: assert_rows_invariant(fn, args, (0,) + (None,) * (len(args) - 1))
               for name, (fn, args) in cases.items()}
    for name, (fn, args) in cases.items():
        assert_close(got[name], fn(*args))


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_3d_by_2d_rows_have_the_same_bits_in_any_batch_and_sequence(seed, dtype):
    B, S, K, N = 9, 13, 40, 24
    x, w, bias = randn(B, S, K, dtype=dtype), randn(K, N, dtype=dtype), randn(N, dtype=dtype)
    with detmoe.invariant_mode(strict=True):
        full = assert_rows_invariant(torch.matmul, (x, w), (0, None))                 # other batch rows
        assert_rows_invariant(torch.matmul, (x, w), (1, None), out_dim=1)             # other sequence rows
        linear = assert_rows_invariant(lambda x: F.linear(x, w.t(), bias), (x,), (1,), out_dim=1)
    assert_close(full, torch.matmul(x, w))
    assert_close(linear, F.linear(x, w.t(), bias))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bmm_and_baddbmm_rows_have_the_same_bits_in_any_batch(seed, dtype):
    G, M, K, N = 6, 11, 40, 24
    a, b, c = randn(G, M, K, dtype=dtype), randn(G, K, N, dtype=dtype), randn(G, N, K, dtype=dtype)
    bias = randn(G, M, N, dtype=dtype)
    baddbmm = lambda bias, a, b: torch.baddbmm(bias, a, b, beta=0.5, alpha=2.0)   # noqa: E731
    with detmoe.invariant_mode(strict=True):
        out = assert_rows_invariant(torch.bmm, (a, b), (0, 0))                       # other groups
        assert_rows_invariant(torch.bmm, (a, b), (1, None), out_dim=1)               # other rows of each group
        # b as a transposed view (eager attention's q @ k^T)
        outt = assert_rows_invariant(lambda a, c: torch.bmm(a, c.transpose(1, 2)), (a, c), (1, None), out_dim=1)
        outb = assert_rows_invariant(baddbmm, (bias, a, b), (0, 0, 0))
        assert_rows_invariant(baddbmm, (bias, a, b), (1, 1, None), out_dim=1)
    assert_close(out, torch.bmm(a, b))
    assert_close(outt, torch.bmm(a, c.transpose(1, 2)))
    assert_close(outb, baddbmm(bias, a, b))


def _grouped(x: torch.Tensor, w_t: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """Tokens x [T, K] routed to expert[t], grouped as transformers groups them (sorted by expert, int32
    cumulative offsets), through torch._grouped_mm -> each token's output, in token order."""
    order = torch.argsort(expert, stable=True)
    offs = torch.bincount(expert, minlength=w_t.shape[0]).cumsum(0).to(torch.int32)
    out = torch._grouped_mm(x[order], w_t, offs=offs)
    return out[torch.argsort(order)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True], ids=["w", "w_transposed_view"])
def test_grouped_mm_token_has_the_same_bits_in_any_group_size_and_position(seed, dtype, transposed):
    T, E, K, N = 60, 5, 32, 24
    x = randn(T, K, dtype=dtype)
    expert = torch.randint(0, E, (T,))
    expert[expert == E - 1] = 0                  # expert E-1 gets no tokens: an empty group
    # transformers passes the weight [E, N, K] transposed, a view: w_t [E, K, N] with stride 1 along K
    w_t = randn(E, N, K, dtype=dtype).transpose(1, 2) if transposed else randn(E, K, N, dtype=dtype)
    with detmoe.invariant_mode(strict=True):
        full = _grouped(x, w_t, expert)
        for idx in random_subsets(T):
            assert_same_bits(_grouped(x[idx], w_t, expert[idx]), full[idx],
                             f"{len(idx)} of {T} tokens grouped alone against all")
    assert_close(full, _grouped(x, w_t, expert))          # PyTorch's _grouped_mm, outside the mode


def test_grouped_mm_3d_by_3d_is_bmm_bits(seed):
    a, b = randn(4, 7, 32), randn(4, 32, 16)
    with detmoe.invariant_mode(strict=True):
        assert_same_bits(torch._grouped_mm(a, b), torch.bmm(a, b), "_grouped_mm 3-D x 3-D against bmm")


# --- reductions ------------------------------------------------------------------------------------------

T_, A_, B_ = 23, 5, 37
# (name, fn, input shape, [(input row dim, output row dim)])
REDUCTIONS = [
    ("sum last", lambda x: x.sum(-1), (T_, B_), [(0, 0)]),
    ("sum middle", lambda x: x.sum(1), (T_, A_, B_), [(0, 0), (2, 1)]),
    ("sum several", lambda x: x.sum((1, 2)), (T_, A_, B_), [(0, 0)]),
    ("sum outer dims", lambda x: x.sum((0, -1)), (A_, T_, B_), [(1, 0)]),
    ("sum keepdim", lambda x: x.sum((-2, -1), keepdim=True), (T_, A_, B_), [(0, 0)]),
    ("sum middle keepdim", lambda x: torch.sum(x, 1, keepdim=True), (T_, A_, B_), [(0, 0), (2, 2)]),
    ("sum in fp32", lambda x: x.sum(-1, dtype=torch.float32), (T_, B_), [(0, 0)]),
    ("mean last", lambda x: x.mean(-1), (T_, B_), [(0, 0)]),
    ("mean middle", lambda x: x.mean(1), (T_, A_, B_), [(0, 0), (2, 1)]),
    ("mean several keepdim", lambda x: x.mean((0, 2), keepdim=True), (A_, T_, B_), [(1, 1)]),
    ("mean in fp32", lambda x: torch.mean(x, 1, dtype=torch.float32), (T_, A_, B_), [(0, 0), (2, 1)]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,fn,shape,row_dims", REDUCTIONS, ids=[r[0] for r in REDUCTIONS])
def test_sum_and_mean_rows_have_the_same_bits_in_any_batch(seed, dtype, name, fn, shape, row_dims):
    x = randn(*shape, dtype=dtype) * 3
    with detmoe.invariant_mode(strict=True):
        for in_dim, out_dim in row_dims:
            got = assert_rows_invariant(fn, (x,), (in_dim,), out_dim)
    want = fn(x)
    tol = TOL[dtype] if got.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
    assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_and_mean_of_all_elements_have_the_bits_of_the_same_numbers_as_a_row(seed, dtype):
    x = randn(5, 7, 9, dtype=dtype)
    n = x.numel()
    with detmoe.invariant_mode(strict=True):
        batch = torch.cat([randn(3, n, dtype=dtype), x.reshape(1, n), randn(4, n, dtype=dtype)])
        for full, rows in [(x.sum(), batch.sum(-1)), (torch.mean(x), batch.mean(-1)),
                           (x.sum(dtype=torch.float32), batch.sum(-1, dtype=torch.float32))]:
            assert_same_bits(full, rows[3], "all elements against the same numbers as row 3 of 8")
    assert_close(full, x.sum(dtype=torch.float32), rtol=1e-5, atol=1e-4)


def test_integer_sums_are_exact_and_equal_to_pytorch(seed):
    big = torch.randint(-2 ** 50, 2 ** 50, (6, 50))          # beyond float precision: summed as integers
    small = torch.randint(-1000, 1000, (6, 50), dtype=torch.int32)
    flags = torch.rand(6, 50) > 0.5
    cases = [lambda: big.sum(-1), lambda: big.sum(), lambda: big.sum(0, keepdim=True), lambda: small.sum(-1),
             lambda: small.sum((0, 1)), lambda: flags.sum(-1), lambda: torch.sum(flags)]
    with detmoe.invariant_mode(strict=True):             # exact: no fallback to warn about
        got = [f() for f in cases]
    for g, f in zip(got, cases):
        want = f()
        assert g.dtype == want.dtype == torch.int64 and torch.equal(g, want)
    assert got[0].tolist() == [sum(r) for r in big.tolist()]


def test_integer_input_summed_in_float_runs_the_fixed_order_sum(seed):
    x = torch.randint(-100, 100, (20, 33))
    with detmoe.invariant_mode(strict=True):
        got = assert_rows_invariant(lambda x: x.sum(-1, dtype=torch.float32), (x,), (0,))
        mean = assert_rows_invariant(lambda x: x.mean(-1, dtype=torch.float32), (x,), (0,))
    assert torch.equal(got, x.sum(-1, dtype=torch.float32))    # small integers: exact in fp32
    assert_close(mean, x.mean(-1, dtype=torch.float32), rtol=1e-6, atol=1e-6)


def test_reduction_edge_cases_give_pytorchs_result_or_error(seed):
    """A 0-D input, an empty reduced dim, an empty batch, a dim out of range or repeated: what PyTorch gives
    (nothing to add in a fixed order) or PyTorch's own error."""
    s, e, rows0 = torch.tensor(3.5), randn(4, 0), randn(0, 6)
    cases = {"0-D sum(0)": lambda: s.sum(0), "0-D mean(-1)": lambda: s.mean(-1),
             "0-D sum keepdim": lambda: s.sum(0, keepdim=True), "empty dim sum": lambda: e.sum(-1),
             "empty dim mean": lambda: e.mean(-1), "empty batch sum": lambda: rows0.sum(-1),
             "softmax over an empty dim": lambda: torch.softmax(e, -1),
             "log_softmax of an empty batch": lambda: F.log_softmax(rows0, -1)}
    with detmoe.invariant_mode(strict=True):
        got = {name: f() for name, f in cases.items()}
        with pytest.raises(IndexError):
            randn(3, 4).sum(2)                   # out of range: not silently dim 0
        with pytest.raises(RuntimeError, match="multiple times"):
            randn(3, 4).sum((1, -1))
    for name, f in cases.items():
        want = f()
        assert got[name].shape == want.shape and torch.equal(got[name].isnan(), want.isnan()), name
        assert torch.equal(got[name].nan_to_num(), want.nan_to_num()), name


SOFTMAXES = [
    ("softmax last", lambda x: torch.softmax(x, -1), (T_, B_), [(0, 0)]),
    ("softmax middle", lambda x: torch.softmax(x, 1), (A_, B_, T_), [(0, 0), (2, 2)]),
    ("softmax first", lambda x: x.softmax(0), (B_, T_), [(1, 1)]),
    ("softmax in fp32", lambda x: torch.softmax(x, -1, dtype=torch.float32), (T_, B_), [(0, 0)]),
    ("log_softmax last", lambda x: F.log_softmax(x, -1), (T_, B_), [(0, 0)]),
    ("log_softmax middle", lambda x: F.log_softmax(x, 1), (A_, B_, T_), [(0, 0), (2, 2)]),
    ("log_softmax in fp32", lambda x: F.log_softmax(x, 0, dtype=torch.float32), (B_, T_), [(1, 1)]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,fn,shape,row_dims", SOFTMAXES, ids=[r[0] for r in SOFTMAXES])
def test_softmax_and_log_softmax_rows_have_the_same_bits_in_any_batch(seed, dtype, name, fn, shape, row_dims):
    x = randn(*shape, dtype=dtype) * 4
    with detmoe.invariant_mode(strict=True):
        for in_dim, out_dim in row_dims:
            got = assert_rows_invariant(fn, (x,), (in_dim,), out_dim)
    tol = TOL[dtype] if got.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    assert_close(got, fn(x), **tol)


def _stable_topk(x: torch.Tensor, k: int, dim: int, largest: bool):
    """The k largest (smallest) along dim, ties to the lowest index: a stable sort's first k."""
    values, indices = torch.sort(x, dim=dim, descending=largest, stable=True)
    return values.narrow(dim, 0, k), indices.narrow(dim, 0, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("largest", [True, False], ids=["largest", "smallest"])
def test_topk_breaks_ties_to_the_lowest_index_and_rows_have_the_same_bits_in_any_batch(seed, dtype, largest):
    k = 6
    ties = torch.randint(-3, 4, (40, 29)).to(dtype)      # 7 values over 29 columns: many exact ties per row
    distinct = torch.unique(randn(20000, dtype=dtype))   # no ties at all (random bf16 values do tie)
    spread = distinct[torch.randperm(len(distinct))[:40 * 29]].view(40, 29)
    with detmoe.invariant_mode(strict=True):
        got = {}
        for name, x in [("ties", ties), ("spread", spread)]:
            for dim in (-1, 0):                          # rows along dim 0 (topk over -1) or dim 1 (over 0)
                got[name, dim] = tuple(
                    assert_rows_invariant(lambda x: torch.topk(x, k, dim=dim, largest=largest)[i], (x,),
                                          (1 + dim,), 1 + dim) for i in (0, 1))
    for (name, dim), (values, indices) in got.items():
        x = ties if name == "ties" else spread
        want_values, want_indices = _stable_topk(x, k, dim, largest)
        assert torch.equal(values, want_values) and torch.equal(indices, want_indices), (name, dim)
        stock_values, stock_indices = torch.topk(x, k, dim=dim, largest=largest)
        assert torch.equal(values, stock_values), (name, dim)       # PyTorch's values (its tie order may differ)
        if name == "spread":
            assert torch.equal(indices, stock_indices), (name, dim)


# --- index_add -------------------------------------------------------------------------------------------

def _sequential_index_add(x, dim, index, source, alpha=1.0):
    """The reference: source's slices added to x one at a time, in source order."""
    out = x.clone()
    o, s = out.movedim(dim, 0), source.movedim(dim, 0)
    for i, d in enumerate(index.tolist()):
        o[d] = o[d] + s[i] * alpha if alpha != 1 else o[d] + s[i]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, 1])
def test_index_add_with_duplicates_adds_in_source_order(seed, dtype, dim):
    D, n, F_ = 7, 60, 19                       # ~9 slices per destination
    shape = lambda rows: (rows, F_) if dim == 0 else (F_, rows)   # noqa: E731
    x, source = randn(*shape(D), dtype=dtype), randn(*shape(n), dtype=dtype) * 8
    index = torch.randint(0, D, (n,))
    want = _sequential_index_add(x, dim, index, source)
    want_alpha = _sequential_index_add(x, dim, index, source, alpha=3.0)
    with detmoe.invariant_mode(strict=True):
        functional = torch.index_add(x, dim, index, source)
        method = x.index_add(dim, index, source, alpha=3.0)
        in_place = x.clone()
        returned = in_place.index_add_(dim, index, source)
        # a destination's bits without the slices aimed at other destinations, in a smaller x
        keep = torch.randperm(D)[:int(torch.randint(1, D + 1, ()))]
        remap = torch.full((D,), -1, dtype=torch.long)
        remap[keep] = torch.arange(len(keep))
        take = remap[index] >= 0
        alone = torch.index_add(x.index_select(dim, keep), dim, remap[index][take],
                                source.index_select(dim, take.nonzero()[:, 0]))
    assert_same_bits(functional, want, "index_add against one slice at a time")
    assert_same_bits(method, want_alpha, "index_add(alpha=3) against one slice at a time")
    assert_same_bits(in_place, want, "index_add_ against one slice at a time")
    assert returned is in_place
    assert_same_bits(alone, want.index_select(dim, keep), "destinations alone against among others")
    assert_close(functional, torch.index_add(x, dim, index, source),
                 **(dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=0.5)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, 1])
def test_scatter_add_adds_each_destinations_values_in_index_order(seed, dtype, dim):
    R, C, n = 6, 9, 40                        # n source rows (or columns) aimed at R destinations
    x = randn(*((R, C) if dim == 0 else (C, R)), dtype=dtype)
    src = randn(*((n + 2, C + 1) if dim == 0 else (C + 1, n + 2)), dtype=dtype) * 8   # larger than index
    index = torch.randint(0, R, (n, C) if dim == 0 else (C, n))
    want = x.clone()
    for pos in torch.cartesian_prod(*[torch.arange(m) for m in index.shape]).tolist():   # row-major order
        dest = list(pos)
        dest[dim] = int(index[tuple(pos)])
        want[tuple(dest)] = want[tuple(dest)] + src[tuple(pos)]
    with detmoe.invariant_mode(strict=True):
        functional = x.scatter_add(dim, index, src)
        in_place = x.clone()
        in_place.scatter_add_(dim, index, src)
        # transformers-style: each token's row to its destination, the index expanded over the columns
        tokens, values = torch.randint(0, R, (n,)), randn(n, C, dtype=dtype)
        rows = torch.zeros(R, C, dtype=dtype).scatter_add(0, tokens[:, None].expand(-1, C), values)
    assert_same_bits(functional, want, "scatter_add against one value at a time")
    assert_same_bits(in_place, want, "scatter_add_ against one value at a time")
    assert_same_bits(rows, _sequential_index_add(torch.zeros(R, C, dtype=dtype), 0, tokens, values),
                     "scatter_add of token rows against index_add one row at a time")
    assert_close(functional, x.scatter_add(dim, index, src),
                 **(dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=0.5)))


# --- CPU elementwise -------------------------------------------------------------------------------------

UNARY = {
    "silu": (F.silu, lambda x: F.silu(x, inplace=True)),
    "sigmoid": (torch.sigmoid, torch.sigmoid_),
    "gelu": (F.gelu, torch.ops.aten.gelu_),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), lambda x: torch.ops.aten.gelu_(x, approximate="tanh")),
    "tanh": (torch.tanh, torch.tanh_),
    "exp": (torch.exp, torch.exp_),
    "cos": (torch.cos, torch.cos_),
    "sin": (torch.sin, torch.sin_),
    "erf": (torch.erf, torch.erf_),
    "rsqrt": (torch.rsqrt, torch.rsqrt_),
    "log": (torch.log, torch.log_),
}
POSITIVE = {"rsqrt", "log"}
LENGTHS = [1, 7, 31, 1000, 32767, 32768, 32769, 70000]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(UNARY))
def test_cpu_elementwise_element_bits_do_not_depend_on_length_offset_or_strides(seed, dtype, name):
    fn, fn_ = UNARY[name]
    n = 70000 + 64
    x = (torch.rand(n) * 20 + 1e-3 if name in POSITIVE else torch.randn(n) * 4).to(dtype)
    with detmoe.invariant_mode(strict=True):
        full = fn(x)
        for L in LENGTHS:
            off = int(torch.randint(0, n - L + 1, ()))
            assert_same_bits(fn(x[off:off + L].clone()), full[off:off + L], f"{L} elements at {off}, a copy")
            assert_same_bits(fn(x[off:off + L]), full[off:off + L], f"{L} elements at {off}, a view")
        # x[:, :F] of a [T, 2F] tensor, and every other element
        T, F_ = 33, 1000
        X = x[:T * 2 * F_].view(T, 2 * F_)
        assert_same_bits(fn(X[:, :F_]), full[:T * 2 * F_].view(T, 2 * F_)[:, :F_], "x[:, :F] of [T, 2F]")
        assert_same_bits(fn(x[1::2]), full[1::2], "x[1::2]")
        # in-place forms: the functional bits, on a copy and on a strided view, the rest untouched
        y = x[:32769].clone()
        assert fn_(y) is y
        assert_same_bits(y, full[:32769], "in place")
        Y = X.clone()
        fn_(Y[:, :F_])
        assert_same_bits(Y[:, :F_], fn(X[:, :F_]), "in place on x[:, :F]")
        assert_same_bits(Y[:, F_:], X[:, F_:], "beside the in-place view")
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert_close(full, fn(x), **tol)


def test_cpu_elementwise_of_an_integer_tensor_falls_back_to_pytorchs_result(seed):
    fallback.forget_warnings()
    x = torch.randint(1, 50, (100,))
    with warnings.catch_warnings(record=True) as caught, detmoe.invariant_mode():
        warnings.simplefilter("always")
        got = {name: getattr(torch, name)(x) for name in ("exp", "sigmoid", "rsqrt")}
        with pytest.raises(RuntimeError, match="can't be cast"):
            x.clone().exp_()                                # as PyTorch: a float result into an int tensor
    for name, g in got.items():
        assert torch.equal(g, getattr(torch, name)(x)) and g.dtype == torch.float32, name
    assert any(issubclass(w.category, detmoe.InvariantModeWarning) and "aten::exp" in str(w.message)
               for w in caught)


# --- attention -------------------------------------------------------------------------------------------

def _requests(lengths, H, Hkv, D):
    return ([randn(H, L, D) for L in lengths], [randn(Hkv, L, D) for L in lengths],
            [randn(Hkv, L, D) for L in lengths])


@pytest.mark.parametrize("case", ["is_causal", "bool_mask", "additive_mask", "gqa"])
def test_sdpa_inside_the_mode_runs_the_padded_attention_override(seed, monkeypatch, case):
    """F.scaled_dot_product_attention reaches the override, which runs padded_attention (spied on) without
    falling back (strict), with its bits; real queries close to PyTorch's, left-padding queries zeros."""
    calls = []
    real = aten_ops.padded_attention

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out
    monkeypatch.setattr(aten_ops, "padded_attention", spy)
    H, Hkv, D = (4, 2, 16) if case == "gqa" else (2, 2, 16)
    lengths = [int(torch.randint(1, 12, ())) for _ in range(3)] + [12]
    if case == "is_causal":
        lengths = lengths[-1:]
    qs, ks, vs = _requests(lengths, H, Hkv, D)
    q, k, v = pad_batch(qs, "left"), pad_batch(ks, "left"), pad_batch(vs, "left")
    S = q.shape[2]
    mask = None if case == "is_causal" else padding_mask(lengths, S, S, "left")
    attn_mask = additive(mask, torch.float32) if case == "additive_mask" else mask
    kwargs = dict(attn_mask=attn_mask, is_causal=case == "is_causal", enable_gqa=H != Hkv)
    with detmoe.invariant_mode(strict=True):
        got = F.scaled_dot_product_attention(q, k, v, **kwargs)
        allowed, why = allowed_from_mask(attn_mask, case == "is_causal", len(lengths), S, S)
        direct = real(q, k, v, allowed, D ** -0.5)
    assert calls == [True] and why is None
    assert_same_bits(got, direct, "F.scaled_dot_product_attention against padded_attention")
    stock = F.scaled_dot_product_attention(q, k, v, **kwargs)
    for b, L in enumerate(lengths):
        pos = real_positions(L, S, "left")
        assert_close(got[b, :, pos], stock[b, :, pos], rtol=1e-4, atol=1e-5)
        assert not got[b, :, :S - L].any(), "a padding query sees no key: zeros"
