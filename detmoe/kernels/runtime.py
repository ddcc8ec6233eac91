"""Where the Triton kernels run: compiled on a CUDA GPU, or under Triton's interpreter on the CPU.

Nothing happens at `import detmoe`: `prepare()` runs when the kernels are first needed (importing
`detmoe.kernels.ops`, which the batch_invariant backend does when it is first used). On a machine without
CUDA, where the user has not set `TRITON_INTERPRET` either way, it switches Triton's interpreter on then,
so `use_backend("batch_invariant")` works with no environment variable set by the user.

How triton (3.4 and later) reads the switch: `@triton.jit` looks at `triton.knobs.runtime.interpret` when it
decorates a function. Our kernels are decorated after `prepare()` (ops/__init__.py calls it before any
kernel module loads), but triton's own library functions (`tl.max`, `tl.sum`, `tl.cdiv`, ...) were
decorated when triton was first imported, often by someone else (transformers, torch.profiler,
torch.compile): if that happened with the switch off, they are compiled-mode functions, which an
interpreted kernel cannot call ("Cannot call @triton.jit'd outside of the scope of a kernel"). So
`prepare()` re-wraps them as the interpreter's functions, as `@triton.jit` itself would have with the
switch on: the order of imports does not matter. The choice is process-wide (Triton has no per-kernel
switch).

Under the interpreter, `tl.dot` is a numpy matmul of the two blocks, and numpy's BLAS picks its kernel
(and so the order in which it sums K) by the block's shape and by the CPU: measured on a 2-core CPU,
row 5 of a fixed-shape [128,128] @ [128,256] fp32 block product changed bits when the same row sat at
positions 6-11, 18-31, ... of the block, and on an AVX-512 Xeon `a @ b[:, :24]` differs from the first 24
columns of `a @ b` for N = 48. So while interpreting we replace the interpreter's dot
(`InterpreterBuilder.create_dot`, a private triton API) by `_ordered_dot`: K products added to the
accumulator one after another with elementwise numpy ops, an order fixed by K alone, so an element's bits
do not depend on its block's other rows or columns, nor on the machine. This is process-wide and only
changes the summation order of an interpreted dot (it also upcasts bf16/fp16 blocks to fp32 first;
products of bf16 values are exact there).

Under the interpreter each program instance runs as Python + numpy (a few ms per program on a small
CPU), so the launchers pick large blocks there to keep the number of program instances small. Under the
interpreter block shapes never depend on the number of rows; on the GPU some tiles do (matmul and
grouped GEMM `tiles_for`), where the GPU tests prove them bit-neutral.

Compiled variants: Triton compiles a kernel once per class of each int argument's value (1, a multiple
of 16, other), so an argument that changes with every step's batch would make a serving run compile a
kernel up to three times per tile. The row counts of the row kernels (rms_norm's, softmax's and the
combine's T) are therefore `do_not_specialize`: they bound rows that are not the contiguous axis of the
large loads and stores, and at most a few small index loads, where the lost vector width costs little.
The matmul's M and the GPU attention kernel's B drop only the multiple-of-16 class
(`do_not_specialize_on_alignment`) and keep the value 1 apart: without it a captured batch-1 decode
step of the `wide` preset was slower (detmoe/kernels/NOTES.md, "Compiled variants"; two variants per
tile, not three).
Counts that mask the contiguous axis of a large load (tree_sum's M, expert_sort's N) stay specialized.
Tiles chosen by the row count (matmul, grouped GEMM) and attention's B_POW2 (at least MIN_SEQ_LANES = 64
lanes, then one variant per power of two of B) still add variants, by design.

Threads: Triton's interpreter is not thread-safe. A launch patches `triton.language` process-wide for its
kernel and undoes it when done, so a second thread's launch in between finds the functions unpatched
("Did you forget to add @triton.jit?"): 2 of 3 concurrent batch_invariant forwards on the CPU failed.
`serialised` takes one process-wide lock (`INTERPRETER_LOCK`) around each backend call while interpreting,
so threads may share the backend and get the bits one thread gets; their kernels then run one at a time.
The lock costs ~1 us a call, 32 calls a tiny-model forward: ~30 us of a ~0.5 s interpreted forward (measured
on 2 CPU cores, within the run-to-run noise). Compiled kernels on a GPU take no lock. For cells in parallel
use processes (run_cells' `jobs`), which each have their own interpreter.
"""
from __future__ import annotations

import functools
import os
import sys
import threading

import numpy as np
import torch

try:
    import triton
except ImportError:   # triton is Linux-only: the torch backend needs none of this module
    triton = None

_prepared = False


def prepare() -> None:
    """Make the Triton kernels runnable in this process (once; called before the first kernel module is
    imported). Without CUDA and with `TRITON_INTERPRET` unset, the interpreter is switched on, triton's
    library re-wrapped for it and its dot and speed patched (below)."""
    global _prepared
    if _prepared:
        return
    if triton is None:
        raise ImportError("the batch_invariant kernels need triton, which is not installed (it ships for Linux "
                          "only); the torch backend works without it")
    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        triton.knobs.runtime.interpret = True
    if triton.knobs.runtime.interpret:
        _check_interpreter_versions()
        from triton.runtime import interpreter
        _rewrap_triton_library(interpreter)
        _ordered_dot.original = interpreter.InterpreterBuilder.create_dot
        interpreter.InterpreterBuilder.create_dot = _ordered_dot
        _speed_up_interpreter(interpreter)
    _prepared = True


def _rewrap_triton_library(interpreter) -> None:
    """triton.language's own @jit functions, decorated compiled-mode because triton was imported before the
    switch, as interpreter functions (what @triton.jit makes of them with the switch on)."""
    from triton.runtime.jit import JITFunction
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "triton.language" or name.startswith("triton.language.")):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                setattr(module, attr, interpreter.InterpretedFunction(value.fn))


# Reentrant: a backend call may call another (grouped_swiglu calls grouped_matmul and swiglu).
INTERPRETER_LOCK = threading.RLock()


def serialised(fn):
    """`fn` holding INTERPRETER_LOCK while interpreting (see "Threads" above); unchanged for compiled kernels."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not interpreting():
            return fn(*args, **kwargs)
        with INTERPRETER_LOCK:
            return fn(*args, **kwargs)
    return call


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """True when @triton.jit kernels run under the interpreter (numpy on the CPU). Cached: the choice is
    process-wide and fixed by `prepare()` (reading the knob costs ~3 us a call)."""
    prepare()
    return bool(triton.knobs.runtime.interpret)


# Host-side integer helpers. `triton.cdiv` and `triton.next_power_of_2` are @jit functions: called from
# Python each goes through the JIT's call path (~5 us on the H100 host, measured by tune_kernels.py --only
# host), and a launcher calls several.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D [rows, last dim] view with unit stride along the last dim (copied only if it has not)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def pow2_at_most(n: int, cap: int) -> int:
    """next_pow2(n), capped at cap."""
    return min(next_pow2(n), cap)


def row_tiles(n: int, interpreter_cap: int, gpu_cap: int, eight_warps_above: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK, num_warps) of a row-wise kernel (rms_norm, softmax) over rows of length n: fixed per
    (n, device), never per row count. A row is one block of up to the cap; GPU programs take one row,
    with 8 warps past `eight_warps_above`. Interpreted, an op costs ~0.1 ms plus its elements, so a
    program takes blocks of ~64k elements (16 to 256 rows)."""
    if interpreting():
        block = pow2_at_most(n, interpreter_cap)
        return max(16, min(256, 65536 // block)), block, 1
    block = pow2_at_most(n, gpu_cap)
    return 1, block, 4 if block <= eight_warps_above else 8


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int = 0) -> int:
    """Streaming multiprocessors of the GPU (used to size grids and schedules); 1 under the interpreter."""
    if interpreting() or not torch.cuda.is_available():
        return 1
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def check_device(name: str, t: torch.Tensor) -> None:
    """Compiled kernels need CUDA tensors; the interpreter needs CPU tensors."""
    if interpreting() and t.is_cuda:
        raise ValueError(f"{name} is on {t.device} but Triton runs in interpreter mode (CPU tensors only)")
    if not interpreting() and not t.is_cuda:
        raise ValueError(f"{name} is on {t.device}; compiled Triton kernels need CUDA tensors")


FLOATS = (torch.float16, torch.bfloat16, torch.float32)   # the dtypes the Triton kernels take and give


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"{name} must match {ref_name}'s dtype/device ({ref.dtype}, {ref.device}), "
                         f"got {t.dtype}, {t.device}")


def check_float(name: str, t: torch.Tensor) -> None:
    check_float_dtype(name, t.dtype)


def check_float_dtype(name: str, dtype: torch.dtype) -> None:
    if dtype not in FLOATS:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {dtype}")


def _as_fp32(handle) -> "np.ndarray":
    """An interpreter block as fp32 numpy (bf16 is stored as uint16 bit patterns there)."""
    import triton.language as tl
    data = handle.data
    if handle.dtype.scalar == tl.bfloat16:
        return (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32)


def _ordered_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    """tl.dot for the interpreter: d + a @ b in fp32, each output element summed in one order fixed by K
    alone, ((d + a[m, 0] * b[0, n]) + a[m, 1] * b[1, n]) + ..., every product and sum rounded to fp32.
    Elementwise numpy ops only (IEEE, one rounding each), so the bits do not depend on the block's M or N,
    on the CPU's SIMD width or on the BLAS build (numpy's matmul picks its BLAS kernel by shape and CPU).
    fp16/bf16/fp32 blocks into an fp32 accumulator only: other dots go to the interpreter's own."""
    from triton.runtime.interpreter import TensorHandle
    import triton.language as tl
    floats = (tl.float32, tl.float16, tl.bfloat16)
    if a.dtype.scalar not in floats or b.dtype.scalar not in floats or d.dtype.scalar != tl.float32:
        # fp8 and integer dots keep the interpreter's own (exact integer sums; fp8 decoded by triton)
        return _ordered_dot.original(self, a, b, d, input_precision, max_num_imprecise_acc)
    a32, b32 = _as_fp32(a), _as_fp32(b)                        # [..., M, K], [..., K, N]
    acc = d.data.astype(np.float32)                            # [..., M, N] (a copy)
    product = np.empty_like(acc)
    for k in range(a32.shape[-1]):
        np.multiply(a32[..., :, k:k + 1], b32[..., k:k + 1, :], out=product)
        acc += product
    return TensorHandle(acc.astype(d.data.dtype, copy=False), d.dtype.scalar)


def _version(text: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "3.9.0" or "2.4.0rc1"."""
    major, minor = text.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _check_interpreter_versions() -> None:
    """Triton's interpreter runs our kernels from triton 3.4 (pyproject's bound; measured on 3.4 and 3.9).
    With numpy >= 2.4 it needs triton >= 3.7: older interpreters convert 1-element arrays to Python ints,
    which numpy 2.4 refuses, so a kernel with a scalar loop bound would fail inside its first launch."""
    if _version(triton.__version__) < (3, 7) and _version(np.__version__) >= (2, 4):
        raise ImportError(f"triton {triton.__version__}'s interpreter cannot run with numpy {np.__version__}: "
                          "install triton>=3.7 or numpy<2.4")


def _speed_up_interpreter(interp) -> None:
    """Two process-wide changes that only make the interpreter faster (private triton APIs, 3.4 to 3.9):

    * No integer-overflow checks: the interpreter's default options sanitise every int32 add/sub/mul
      (`binary_op_sanitize_overflow_impl`, one extra int64 op and a compare per index op). Compiled
      kernels only check this in debug mode, so switching it off makes the interpreter do what the GPU does.
      Measured: a quarter of the interpreted attention time before this change.
    * Nested @triton.jit calls patch triton.language only once per function: `InterpretedFunction.__call__`
      re-runs `_patch_lang` (~2 ms of setattr) on EVERY call of a nested jit function, and `tl.sum`,
      `tl.max` and `tl.cdiv` are such functions. Those patches are never undone by triton (the nested
      call drops its scope), so after the first call of a function they are still in place; the outer
      launch re-applies the shared ones (tl.tensor methods) itself.
    """
    import dataclasses
    interp.interpreter_builder.options = dataclasses.replace(interp.interpreter_builder.options,
                                                             sanitize_overflow=False)
    patched: set = set()
    original_call = interp.InterpretedFunction.__call__

    def call_nested(self, *args, **kwargs):
        if self.fn in patched:
            fn = self.rewrite()
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                raise interp.InterpreterError(repr(e)) from e
        patched.add(self.fn)
        return original_call(self, *args, **kwargs)

    interp.InterpretedFunction.__call__ = call_nested


# Test hook: when True, launchers fill outputs and workspaces with NaN instead of leaving them
# uninitialised, so a test sees any element a kernel failed to write (tests/kernels/conftest.py sets it).
poison_outputs = False


def empty(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty, or NaN-filled (-1 for integers) while `poison_outputs` is set."""
    if not poison_outputs:
        return torch.empty(shape, device=device, dtype=dtype)
    return torch.full(shape, float("nan") if dtype.is_floating_point else -1, device=device, dtype=dtype)
