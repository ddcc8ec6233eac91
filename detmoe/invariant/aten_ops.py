"""The aten operators `invariant_mode()` replaces, as kernels registered with `torch.library` for the CPU and
CUDA dispatch keys while the mode is on (detmoe/invariant/mode.py registers and removes them).

Each override runs the call on detmoe's batch-invariant kernels (detmoe/kernels, `batch_invariant` backend),
whose reduction order is fixed by the reduced length alone, never by the number of rows:

    mm, addmm, bmm, baddbmm (so linear and matmul)   -> kernels.matmul / kernels.grouped_matmul
    _grouped_mm (transformers' grouped experts)      -> kernels.grouped_matmul
    sum, mean (any dims)                             -> a fixed-order row sum (kernels.matmul by ones, fp32)
    _softmax, _log_softmax (any dim)                 -> kernels.softmax / kernels.log_softmax
    topk                                             -> kernels.top_k (ties to the lowest index)
    index_add(_), scatter_add(_)                     -> adds in source order, one level of duplicates at a time
    scaled_dot_product_attention                     -> detmoe/invariant/attention.py (padding-invariant)
    mv, addmv                                        -> kernels.matmul
    silu, sigmoid, gelu, tanh, exp, log, cos, sin, erf, rsqrt, pow by a scalar (CPU only; and in-place)
                                                     -> PyTorch's kernel on fixed 32768-element chunks

The last group is there because PyTorch's CPU kernels compute an element in a loop's vector body or in its
scalar tail depending on where it falls in the tensor (measured: silu, sigmoid, gelu in fp32 and rsqrt in
bf16 give other bits in the tail), so an element's bits depend on the tensor's length. On fixed chunks
whose length is a multiple of every vector width, and below PyTorch's parallel grain, every element runs
through the vector body. CUDA's elementwise kernels apply one function per element and need nothing.

A call an override cannot run (a dtype or device our kernels do not take, a mask that is not causal
padding, a form of _grouped_mm with groups along K) runs PyTorch's kernel through the operator's `out=`
form, which the mode leaves alone, after `fallback.fall_back` warns once or raises under strict. Integer
and bool sums, whose additions are exact in any order, run PyTorch's kernel without a word. Inside an
override, torch calls run PyTorch's kernels (`fallback.override_body`).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence

import torch

from detmoe import kernels
from detmoe.invariant.attention import allowed_from_mask, padded_attention
from detmoe.invariant.fallback import fall_back, inside_override, override_body
from detmoe.kernels import runtime

aten = torch.ops.aten
CPU_CHUNK = 32768   # PyTorch's parallel grain (at::internal::GRAIN_SIZE); a multiple of every vector width


class Unsupported(Exception):
    """This call runs on PyTorch's kernel; the message says why."""


class Exact(Exception):
    """This call's result does not depend on the order of its arithmetic: PyTorch's kernel, silently."""


AUTOGRAD = ("autograd: an input requires a gradient and the kernels have no backward (the mode is for "
            "inference: run under torch.no_grad() or torch.inference_mode())")


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# (aten name with overload, dispatch keys, implementation), filled by @override
OVERRIDES: list[tuple[str, tuple[str, ...], Callable]] = []


def override(name: str, stock: Callable, keys: tuple[str, ...] = ("CPU", "CUDA")):
    """Register `fn` as the mode's kernel for `name`; `stock` computes the call with PyTorch's kernels."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def impl(*args, **kwargs):
            if inside_override():
                return stock(*args, **kwargs)
            with override_body():
                try:
                    if needs_grad(*(a for a in args if isinstance(a, torch.Tensor))):
                        raise Unsupported(AUTOGRAD)
                    with kernels.use_backend("batch_invariant"):
                        return fn(*args, **kwargs)
                except Exact:
                    return stock(*args, **kwargs)
                except Unsupported as e:
                    fall_back(f"aten::{name}", str(e))
                    return stock(*args, **kwargs)
        OVERRIDES.append((name, keys, impl))
        return impl
    return wrap


def check_kernel_inputs(*tensors: torch.Tensor, exact_ok: bool = False) -> None:
    """Raise Unsupported unless every tensor is a float our kernels take, on the device they run on."""
    for t in tensors:
        if t.dtype not in runtime.FLOATS:
            if exact_ok and not t.is_floating_point() and not t.is_complex():
                raise Exact()
            raise Unsupported(f"dtype {t.dtype} (the kernels take float16, bfloat16, float32)")
        if t.is_cuda == runtime.interpreting():
            raise Unsupported(f"a {t.device.type} tensor (the kernels run on "
                              f"{'CPU tensors, interpreted' if runtime.interpreting() else 'CUDA tensors'})")
    if len({t.dtype for t in tensors}) > 1:
        raise Unsupported("operands of different dtypes")


def _empty(like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return torch.empty(0, dtype=dtype or like.dtype, device=like.device)   # resized by the out= kernel


# --- products -------------------------------------------------------------------------------------------

def _stock_mm(a, b):
    return aten.mm.out(a, b, out=_empty(a))


@override("mm", _stock_mm)
def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    check_kernel_inputs(a, b)
    return kernels.matmul(a, b)


def _stock_addmm(bias, a, b, *, beta=1, alpha=1):
    return aten.addmm.out(bias, a, b, beta=beta, alpha=alpha, out=_empty(a))


@override("addmm", _stock_addmm)
def addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    check_kernel_inputs(bias, a, b)
    return _scaled_sum(bias, kernels.matmul(a, b), beta, alpha)


def _scaled_sum(bias: torch.Tensor, product: torch.Tensor, beta, alpha) -> torch.Tensor:
    """beta * bias + alpha * product, elementwise (so invariant); beta = 0 ignores bias, NaN included."""
    if alpha != 1:
        product = product * alpha
    if beta == 0:
        return product
    return product + (bias if beta == 1 else bias * beta)


@override("mv", lambda a, x: aten.mv.out(a, x, out=_empty(a)))
def mv(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    check_kernel_inputs(a, x)
    if a.dim() != 2 or x.dim() != 1:
        raise Exact()   # PyTorch names the error
    return kernels.matmul(a, x[:, None])[:, 0]


@override("addmv", lambda b, a, x, *, beta=1, alpha=1: aten.addmv.out(b, a, x, beta=beta, alpha=alpha, out=_empty(a)))
def addmv(bias: torch.Tensor, a: torch.Tensor, x: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    return _scaled_sum(bias, mv.__wrapped__(a, x), beta, alpha)


def _batched(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [G, M, K] @ b [G, K, N] as one grouped GEMM of G groups of M rows: each row summed as the dense
    matmul sums it, whatever G is."""
    G, M, K = a.shape
    rows = a.reshape(G * M, K)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    offsets = torch.arange(1, G + 1, device=a.device, dtype=torch.int32) * M
    return kernels.grouped_matmul(rows, b, offsets).view(G, M, b.shape[2])


def _stock_bmm(a, b):
    return aten.bmm.out(a, b, out=_empty(a))


@override("bmm", _stock_bmm)
def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    check_kernel_inputs(a, b)
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise Unsupported(f"shapes {tuple(a.shape)} and {tuple(b.shape)}")   # PyTorch names the error
    return _batched(a, b)


def _stock_baddbmm(bias, a, b, *, beta=1, alpha=1):
    return aten.baddbmm.out(bias, a, b, beta=beta, alpha=alpha, out=_empty(a))


@override("baddbmm", _stock_baddbmm)
def baddbmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    check_kernel_inputs(bias, a, b)
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise Unsupported(f"shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return _scaled_sum(bias, _batched(a, b), beta, alpha)


def _stock_grouped_mm(x, w, offs=None, bias=None, out_dtype=None):
    """PyTorch's _grouped_mm is replaced for the whole mode, so its fallback is the same product as
    PyTorch's mm per group (the forms inference uses)."""
    if x.dim() == 3 and w.dim() == 3 and offs is None:
        out = aten.bmm.out(x, w, out=_empty(x))
    elif x.dim() == 2 and w.dim() == 3 and offs is not None:
        out = x.new_zeros(x.shape[0], w.shape[2])
        start = 0
        for e, end in enumerate(offs.tolist()):
            if end > start:
                out[start:end] = aten.mm.out(x[start:end], w[e], out=_empty(x))
            start = end
    else:
        raise NotImplementedError(f"invariant_mode: _grouped_mm of {x.dim()}-D by {w.dim()}-D operands "
                                  f"(groups along K, a training form) is not available inside the mode")
    if bias is not None:
        out = out + (bias if offs is None or bias.dim() == 1 else
                     bias[torch.searchsorted(offs, torch.arange(x.shape[0], device=x.device), right=True)
                          .clamp_(max=bias.shape[0] - 1)])
    return out if out_dtype is None else out.to(out_dtype)


@override("_grouped_mm", _stock_grouped_mm)
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    check_kernel_inputs(x, w)
    if bias is not None or out_dtype not in (None, x.dtype):
        raise Unsupported("a bias or another out_dtype")
    if x.dim() == 3 and w.dim() == 3 and offs is None:
        return _batched(x, w)
    if x.dim() != 2 or w.dim() != 3 or offs is None:
        raise Unsupported(f"a {x.dim()}-D by {w.dim()}-D product (groups along K)")
    return kernels.grouped_matmul(x, w, offs if offs.dtype == torch.int32 else offs.to(torch.int32))


# --- reductions -----------------------------------------------------------------------------------------

def _dims(x: torch.Tensor, dim: Optional[Sequence[int]]) -> list[int]:
    if x.dim() == 0:
        raise Exact()   # one element, nothing added (and PyTorch checks the dim)
    if dim is None or len(dim) == 0:
        return list(range(x.dim()))
    if any(not -x.dim() <= d < x.dim() for d in dim) or len({d % x.dim() for d in dim}) != len(dim):
        raise Exact()   # PyTorch names the error (a dim out of range or repeated)
    return sorted({d % x.dim() for d in dim})


def _row_sum(x: torch.Tensor, dim: Optional[Sequence[int]], keepdim: bool) -> tuple[torch.Tensor, int]:
    """The sum over `dim` in fp32 with a fixed order (the matmul's, by a column of ones) -> (sum, count)."""
    dims = _dims(x, dim)
    kept = [d for d in range(x.dim()) if d not in dims]
    count = n_rows = 1
    for d in dims:
        count *= x.shape[d]
    for d in kept:
        n_rows *= x.shape[d]
    if count == 0 or n_rows == 0:
        raise Exact()   # nothing is added
    rows = x.permute(*kept, *dims).reshape(n_rows, count).float()
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    total = kernels.matmul(rows, torch.ones(count, 1, dtype=torch.float32, device=x.device))
    shape = [x.shape[d] for d in kept]
    total = total.reshape(shape)
    if keepdim:
        for d in dims:
            total = total.unsqueeze(d)
    return total, count


def _sum_dtype(x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is not None:
        return dtype
    return x.dtype if x.is_floating_point() or x.is_complex() else torch.int64


def _stock_sum(x, dim=None, keepdim=False, *, dtype=None):
    return aten.sum.IntList_out(x, dim, keepdim, dtype=dtype, out=_empty(x, _sum_dtype(x, dtype)))


def _reduced_input(x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    if dtype is not None and dtype in runtime.FLOATS and not x.is_floating_point():
        x = x.to(dtype)    # integers summed as floats: the fp32 sum below, in a fixed order
    if x.dtype not in runtime.FLOATS or (dtype is not None and dtype not in runtime.FLOATS):
        check_kernel_inputs(x, exact_ok=dtype is None or not dtype.is_floating_point)
        raise Unsupported(f"a sum in {dtype}")
    check_kernel_inputs(x)
    return x


@override("sum.dim_IntList", _stock_sum)
def sum_dims(x: torch.Tensor, dim=None, keepdim: bool = False, *, dtype=None) -> torch.Tensor:
    total, _ = _row_sum(_reduced_input(x, dtype), dim, keepdim)
    return total.to(_sum_dtype(x, dtype))


@override("sum", lambda x, *, dtype=None: _stock_sum(x, None, False, dtype=dtype))
def sum_all(x: torch.Tensor, *, dtype=None) -> torch.Tensor:
    return sum_dims.__wrapped__(x, None, False, dtype=dtype)


def _stock_mean(x, dim=None, keepdim=False, *, dtype=None):
    return aten.mean.out(x, dim, keepdim, dtype=dtype, out=_empty(x, dtype or x.dtype))


@override("mean.dim", _stock_mean)
def mean_dims(x: torch.Tensor, dim=None, keepdim: bool = False, *, dtype=None) -> torch.Tensor:
    total, count = _row_sum(_reduced_input(x, dtype), dim, keepdim)
    return (total / count).to(dtype or x.dtype)


@override("mean", lambda x, *, dtype=None: _stock_mean(x, None, False, dtype=dtype))
def mean_all(x: torch.Tensor, *, dtype=None) -> torch.Tensor:
    return mean_dims.__wrapped__(x, None, False, dtype=dtype)


def _softmax_like(x: torch.Tensor, dim: int, half_to_float: bool, log: bool) -> torch.Tensor:
    check_kernel_inputs(x)
    if x.dim() == 0 or x.numel() == 0:
        raise Exact()
    last = x.movedim(dim, -1)
    out = kernels.log_softmax(last) if log else kernels.softmax(last)   # fp32
    return out.to(torch.float32 if half_to_float else x.dtype).movedim(-1, dim).contiguous()


@override("_softmax", lambda x, dim, h: aten._softmax.out(x, dim, h, out=_empty(x, torch.float32 if h else None)))
def softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    return _softmax_like(x, dim, half_to_float, log=False)


@override("_log_softmax",
          lambda x, dim, h: aten._log_softmax.out(x, dim, h, out=_empty(x, torch.float32 if h else None)))
def log_softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    return _softmax_like(x, dim, half_to_float, log=True)


def _stock_topk(x, k, dim=-1, largest=True, sorted=True):
    return aten.topk.values(x, k, dim, largest, sorted, values=_empty(x), indices=_empty(x, torch.int64))


@override("topk", _stock_topk)
def topk(x: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
    check_kernel_inputs(x)
    if x.dim() == 0 or k == 0 or not 1 <= k <= x.shape[dim]:
        raise Exact()   # PyTorch's result (or error) takes no choice among ties
    if not largest and bool(x.isnan().any()):
        raise Unsupported("NaN among the smallest (PyTorch ranks NaN largest either way)")
    last = x.movedim(dim, -1)
    rows = last.reshape(-1, last.shape[-1])
    idx, val = kernels.top_k(rows if largest else -rows, int(k))   # sorted, ties to the lowest index
    if not largest:
        val = -val
    shape = (*last.shape[:-1], int(k))
    return val.reshape(shape).movedim(-1, dim).contiguous(), idx.reshape(shape).movedim(-1, dim).contiguous()


# --- combines -------------------------------------------------------------------------------------------

def _stock_index_add(x, dim, index, source, *, alpha=1):
    return aten.index_add.out(x, dim, index, source, alpha=alpha, out=_empty(x))


def _ordered_index_add(x: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor, alpha) -> torch.Tensor:
    """x with source's slices added at `index` along dim: each destination's additions in source order
    (the k-th slice aimed at a destination is added in round k), never two at once, so no atomics."""
    if x.dtype != source.dtype or index.dim() > 1 or x.dim() == 0:
        raise Unsupported("mixed dtypes or a 0-D/multi-D index")   # PyTorch names the error
    if not (x.is_floating_point() or x.is_complex()):
        raise Exact()
    out = x.movedim(dim, 0).clone()
    src = source.movedim(dim, 0)
    if alpha != 1:
        src = src * alpha
    n = index.numel()
    if n == 0:
        return out.movedim(0, dim)
    index = index.reshape(-1).long()
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    starts = torch.ones(n, dtype=torch.bool, device=x.device)
    starts[1:] = sorted_index[1:] != sorted_index[:-1]
    position = torch.arange(n, device=x.device)
    rank = position - torch.where(starts, position, 0).cummax(0).values   # k-th slice for its destination
    for k in range(int(rank.max()) + 1):
        take = order[rank == k]
        dest = index[take]
        out[dest] = out[dest] + src[take]
    return out.movedim(0, dim)


@override("index_add", _stock_index_add)
def index_add(x: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor, *, alpha=1) -> torch.Tensor:
    return _ordered_index_add(x, dim, index, source, alpha).contiguous()


def _stock_index_add_(x, dim, index, source, *, alpha=1):
    return x.copy_(_stock_index_add(x, dim, index, source, alpha=alpha))


@override("index_add_", _stock_index_add_)
def index_add_(x: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor, *, alpha=1) -> torch.Tensor:
    return x.copy_(_ordered_index_add(x, dim, index, source, alpha))


def _stock_scatter_add(x, dim, index, src):
    return aten.scatter_add.out(x, dim, index, src, out=_empty(x))


def _ordered_scatter_add(x: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """x with src[i] added at x[i with index[i] along dim], for every position i of index: each destination's
    additions in the row-major order of index, as `_ordered_index_add` adds them."""
    if x.dtype != src.dtype or index.dim() != x.dim() or index.dim() != src.dim() or x.dim() == 0:
        raise Unsupported("mixed dtypes or ranks")   # PyTorch names the error
    if any(index.shape[d] > src.shape[d] or (d != dim % x.dim() and index.shape[d] > x.shape[d])
           for d in range(x.dim())):
        raise Unsupported("an index larger than its source or destination")
    dim = dim % x.dim()
    where = torch.meshgrid(*[torch.arange(n, device=x.device) for n in index.shape], indexing="ij")
    where = [index.long() if d == dim else w for d, w in enumerate(where)]
    flat = sum(w * math.prod(x.shape[d + 1:]) for d, w in enumerate(where))   # row-major position in x
    values = src[tuple(slice(0, n) for n in index.shape)].reshape(-1)
    return _ordered_index_add(x.reshape(-1), 0, flat.reshape(-1), values, 1).view(x.shape)


@override("scatter_add", _stock_scatter_add)
def scatter_add(x: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return _ordered_scatter_add(x, dim, index, src)


@override("scatter_add_", lambda x, dim, index, src: x.copy_(_stock_scatter_add(x, dim, index, src)))
def scatter_add_(x: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return x.copy_(_ordered_scatter_add(x, dim, index, src))


# --- attention ------------------------------------------------------------------------------------------

def _stock_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    """The mode replaces the operator that chooses among PyTorch's attention kernels; its fallback runs that
    chooser itself (the operator's CompositeImplicitAutograd kernel, past the mode's CPU/CUDA ones), so a call
    gets what it gets outside the mode: the same kernel, mask conversion and bits, and the same errors (the
    math kernel alone refuses calls PyTorch's CPU flash kernel takes, such as a mask with is_causal)."""
    return aten.scaled_dot_product_attention.default.decompose(q, k, v, attn_mask, dropout_p, is_causal,
                                                               scale=scale, enable_gqa=enable_gqa)


@override("scaled_dot_product_attention", _stock_sdpa)
def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
         dropout_p: float = 0.0, is_causal: bool = False, *, scale: Optional[float] = None,
         enable_gqa: bool = False) -> torch.Tensor:
    check_kernel_inputs(q, k, v)
    if dropout_p > 0:
        raise Unsupported("dropout")
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[-1] != k.shape[-1]:
        raise Unsupported(f"query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)} (the kernel "
                          f"takes [batch, heads, length, head_dim] with equal key and value shapes)")
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if q.numel() == 0 or k.numel() == 0:
        raise Exact()   # nothing is summed
    if k.shape[0] != B or H % Hkv or (Hkv != H and not enable_gqa):
        raise Unsupported(f"{H} query heads over {Hkv} key heads{'' if enable_gqa else ' without enable_gqa'}")
    allowed, why = allowed_from_mask(attn_mask, is_causal, B, Sq, Sk)
    if why is not None:
        raise Unsupported(why)
    out = padded_attention(q, k, v, allowed, D ** -0.5 if scale is None else scale, mask=attn_mask)
    if out is None:
        raise Unsupported("a mask other than causal attention over padded rows")
    return out


# --- CPU elementwise ------------------------------------------------------------------------------------

def _chunked(op_out: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """op on x through PyTorch's kernel, on CPU_CHUNK-element chunks of a zero-padded flat copy."""
    n = x.numel()
    padded = -(-n // CPU_CHUNK) * CPU_CHUNK
    src = x.new_zeros(padded)
    src[:n] = x.reshape(-1)
    out = torch.empty_like(src)
    for start in range(0, padded, CPU_CHUNK):
        op_out(src[start:start + CPU_CHUNK], *args, out=out[start:start + CPU_CHUNK], **kwargs)
    result = out[:n].view(x.shape)
    return result.clone() if padded > 2 * n else result   # a small tensor does not keep its chunk alive


CPU_ELEMENTWISE = ("silu", "sigmoid", "gelu", "tanh", "exp", "log", "cos", "sin", "erf", "rsqrt")


def _elementwise(name: str, functional: str = "default", out: str = "out", inplace: str = "default") -> None:
    """Chunked CPU overrides of aten::<name>.<functional> and aten::<name>_.<inplace>."""
    op = getattr(getattr(aten, name), functional)
    op_out = getattr(getattr(aten, name), out)

    def stock(x, *args, **kwargs):
        # in the dtype PyTorch's functional form gives (an integer input promotes to float): its meta kernel's
        dtype = op(x.to("meta"), *args, **kwargs).dtype
        return op_out(x, *args, out=_empty(x, dtype), **kwargs)

    def run(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not x.is_floating_point() or x.is_cuda:
            raise Unsupported(f"a {x.dtype} {x.device.type} tensor")
        return _chunked(op_out, x, *args, **kwargs)

    suffix = "" if functional == "default" else "." + functional
    override(name + suffix, stock, keys=("CPU",))(run)
    if hasattr(aten, name + "_"):
        suffix = "" if inplace == "default" else "." + inplace
        override(name + "_" + suffix, lambda x, *a, **k: op_out(x, *a, out=x, **k), keys=("CPU",))(
            lambda x, *a, **k: x.copy_(run(x, *a, **k)))


for _name in CPU_ELEMENTWISE:
    _elementwise(_name)
del _name
_elementwise("pow", "Tensor_Scalar", "Tensor_Scalar_out", "Scalar")   # x ** 1.7 (x ** 2 is exact anyway)
