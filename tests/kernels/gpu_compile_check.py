"""Compile Triton kernels for an H100 (sm_90) on a machine without a GPU: the compiler runs on the CPU,
so code that only the interpreter has run is checked against the real compiler's rules (a constexpr
reassigned in an unrolled loop, for one, is legal in the interpreter and not in the compiler). Run by
tests/kernels/test_gpu_compile.py in a process of its own, with the interpreter off; exit code 2: this
machine cannot compile for the GPU at all (no toolchain), so the test skips."""
from __future__ import annotations

import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from detmoe import kernels  # noqa: F401  (TRITON_INTERPRET=0 in the environment: the kernels are compiled-mode)
from detmoe.kernels import runtime

TARGET = GPUTarget("cuda", 90, 32)


def compile_one(fn, signature: dict, constexprs: dict, **options) -> None:
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=TARGET,
                   options={"num_warps": 4, **options})


def cases():
    """(name, kernel, signature, constexprs, options): the constexpr values each launcher uses on the GPU."""
    from detmoe.kernels.ops.combine import _ordered_combine_kernel
    from detmoe.kernels.ops.expert_sort import _expert_sort_kernel
    from detmoe.kernels.ops.tree_sum import _tree_sum_kernel
    for n in (1, 2, 4, 8, 16):
        for out in ("*bf16", "*fp16", "*fp32"):
            yield (f"tree_sum n={n} {out}", _tree_sum_kernel,
                   {"p_ptr": "*fp32", "y_ptr": out, "M": "i32", "stride_leaf": "i32"},
                   {"LEAVES": n, "LEVELS": n.bit_length() - 1, "BLOCK": max(128, 4096 // n), "BY_BITS": False}, {})
    yield ("expert_sort", _expert_sort_kernel,
           {"e_ptr": "*i64", "order_ptr": "*i64", "offsets_ptr": "*i32", "N": "i32", "E": "i32"},
           {"BLOCK_I": 64, "BLOCK_J": 128}, {})
    from detmoe.kernels.ops.expert_sort import COUNT_BLOCK, COUNT_STEP, _count_kernel, _place_kernel
    for e_pow2 in (8, 64, 256):
        yield (f"expert_sort counts E={e_pow2}", _count_kernel,
               {"e_ptr": "*i64", "counts_ptr": "*i32", "N": "i32"},
               {"BLOCK": COUNT_BLOCK, "STEP": COUNT_STEP, "E_POW2": e_pow2}, {})
        yield (f"expert_sort place E={e_pow2}", _place_kernel,
               {"e_ptr": "*i64", "counts_ptr": "*i32", "order_ptr": "*i64", "offsets_ptr": "*i32", "N": "i32",
                "E": "i32", "n_blocks": "i32"},
               {"BLOCK": COUNT_BLOCK, "STEP": COUNT_STEP, "E_POW2": e_pow2}, {})
    from detmoe.kernels.ops.rmsnorm import _rms_norm_kernel
    from detmoe.kernels.ops.softmax import _softmax_kernel
    for dt in ("*bf16", "*fp32"):
        for residual in (False, True):
            yield (f"rms_norm {dt} residual={residual}", _rms_norm_kernel,
                   {"x_ptr": dt, "r_ptr": dt, "w_ptr": dt, "out_ptr": dt, "sum_ptr": dt, "T": "i32", "D": "i32",
                    "stride_xt": "i32", "stride_ot": "i32", "eps": "fp32"},
                   {"ROWS": 1, "BLOCK_D": 4096, "RESIDUAL": residual, "BY_BITS": False}, {"num_warps": 8})
        for log in (False, True):
            yield (f"softmax log={log} {dt}", _softmax_kernel,
                   {"x_ptr": dt, "out_ptr": "*fp32", "T": "i32", "N": "i32", "stride_xt": "i32", "stride_ot": "i32"},
                   {"LOG": log, "ROWS": 1, "BLOCK_N": 1024}, {})
    from detmoe.kernels.ops.matmul import _matmul_kernel
    three = {"w2_ptr": "*bf16", "w3_ptr": "*bf16", **{a: "i32" for a in ("N1", "N2", "stride_wk2", "stride_wk3")}}
    for (bm, bn, bk), n_weights in itertools.product(((64, 128, 64), (128, 256, 64)), (1, 3)):
        # a decode-sized and a prefill-sized tile, one weight or three side by side
        yield (f"matmul {bm}x{bn}x{bk} bf16 {n_weights} weights", _matmul_kernel,
               {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", **{a: "i32" for a in (
                   "M", "N", "K", "stride_xm", "stride_xk", "stride_wk", "stride_wn", "stride_om", "stride_on",
                   "stride_oc")}, **three},
               {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "EVEN_K": True, "PRECISION": "tf32",
                "SUMMED": 1, "BY_BITS": False, "THREE": n_weights == 3, "AT_ONCE": 1, "WIDEN": False},
               {"num_warps": 8 if bm == 128 else 4, "num_stages": 3})
    yield ("matmul widened bf16 -> fp32 (the logits)", _matmul_kernel,
           {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*fp32", **{a: "i32" for a in (
               "M", "N", "K", "stride_xm", "stride_xk", "stride_wk", "stride_wn", "stride_om", "stride_on",
               "stride_oc")}, **three},
           {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "EVEN_K": True, "PRECISION": "tf32",
            "SUMMED": 1, "BY_BITS": False, "THREE": False, "AT_ONCE": 1, "WIDEN": True},
           {"num_warps": 8, "num_stages": 3})
    # the row-parallel trees: on the dense one-kernel tiles (64x64, 4 warps, 4 stages), with a K that is
    # and one that is not a whole number of steps, and on a tile fit_for_chunk_sum gives
    # (chunks walked one at a time, two or four per loop)
    for summed, (bm, bn, warps, stages), even_k, at_once in (
            (2, (64, 64, 4, 4), True, 1), (4, (64, 64, 4, 4), False, 1), (8, (64, 64, 4, 4), True, 1),
            (4, (128, 128, 8, 3), True, 1), (4, (64, 64, 4, 4), False, 2), (8, (64, 64, 4, 4), True, 4)):
        for out in ("*bf16", "*fp32"):
            yield (f"matmul chunk sum {summed} {bm}x{bn} even_k={even_k} x{at_once} {out}", _matmul_kernel,
                   {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": out, **{a: "i32" for a in (
                       "M", "N", "K", "stride_xm", "stride_xk", "stride_wk", "stride_wn", "stride_om", "stride_on",
                       "stride_oc")}, **three},
                   {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8, "EVEN_K": even_k,
                    "PRECISION": "tf32", "SUMMED": summed, "BY_BITS": False, "THREE": False, "AT_ONCE": at_once,
                    "WIDEN": False},
                   {"num_warps": warps, "num_stages": stages})
    from detmoe.kernels.ops.grouped_gemm import _grouped_mm_kernel
    for summed, bm, bn, warps, swiglu, at_once in (
            (1, 64, 128, 4, False, 1), (1, 128, 256, 8, False, 1), (4, 64, 128, 4, False, 1),
            (4, 128, 128, 8, False, 1), (1, 64, 128, 4, True, 1), (1, 128, 256, 8, True, 1),
            (4, 64, 256, 8, False, 2), (4, 128, 64, 8, False, 4)):
        yield (f"grouped {bm}x{bn} chunk sum {summed} x{at_once} swiglu={swiglu}", _grouped_mm_kernel,
               {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "row_ends_ptr": "*i32",
                "src_ptr": "*i64" if swiglu else "*bf16", **{a: "i32" for a in (
                   "E", "N", "K", "stride_xm", "stride_xk", "stride_we", "stride_wk", "stride_wn", "stride_om",
                   "stride_on", "stride_oc")}},
               {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "E_POW2": 64, "PRECISION": "tf32", "SUMMED": summed,
                "BY_BITS": False, "GATHER": swiglu, "SRC_DIV": 8 if swiglu else 1, "SWIGLU": swiglu,
                "INTERPRETED": False, "AT_ONCE": at_once},
               {"num_warps": warps, "num_stages": 3, "enable_fp_fusion": not swiglu})
    from detmoe.kernels.ops.rope import _rope_and_store_kernel
    yield ("rope_and_store bf16", _rope_and_store_kernel,
           {**{p: "*bf16" for p in ("q_ptr", "k_ptr", "v_ptr", "q_out_ptr", "k_cache_ptr", "v_cache_ptr")},
            "cos_ptr": "*fp32", "sin_ptr": "*fp32", "slots_ptr": "*i64", "pos_ptr": "*i64", **{a: "i32" for a in (
                "T", "stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_ct",
                "stride_ot", "stride_oh", "stride_cs", "stride_cl", "stride_ch")}},
           {"H": 16, "HKV": 4, "H_POW2": 16, "HKV_POW2": 4, "HALF": 64, "ROWS": 1, "BY_BITS": False},
           {"enable_fp_fusion": False})
    from detmoe.kernels.ops.top_k import _top_k_kernel
    for n_pow2 in (8, 64, 256):
        yield (f"top_k N={n_pow2}", _top_k_kernel,
               {"x_ptr": "*fp32", "idx_ptr": "*i64", "val_ptr": "*fp32", **{a: "i32" for a in (
                   "T", "N", "stride_xt", "stride_it", "stride_vt")}},
               {"K": 8 if n_pow2 > 8 else 2, "ROWS": 8, "N_POW2": n_pow2}, {"num_warps": 1})
    for S in (1, 2, 8):
        yield (f"ordered_combine S={S}", _ordered_combine_kernel,
               {"out_ptr": "*bf16", "inv_ptr": "*i32", "w_ptr": "*fp32", "y_ptr": "*bf16", "T": "i32", "D": "i32",
                "stride_out": "i32", "stride_wt": "i32", "stride_yt": "i32"},
               {"S": S, "ROWS": 4, "BLOCK_D": 256, "BY_BITS": False}, {"enable_fp_fusion": False})


def main() -> int:
    if runtime.interpreting():
        print("the interpreter is on: run with TRITON_INTERPRET=0")
        return 1

    @triton.jit
    def _trivial(x_ptr):
        tl_arange = triton.language.arange(0, 16)
        triton.language.store(x_ptr + tl_arange, tl_arange)
    try:
        compile_one(_trivial, {"x_ptr": "*i32"}, {})
    except Exception as e:  # no ptxas / no CUDA backend in this triton build
        print(f"cannot compile for {TARGET} here: {e!r}")
        return 2
    failed = []
    for name, fn, sig, consts, opts in cases():
        try:
            compile_one(fn, sig, consts, **opts)
        except Exception as e:
            failed.append(name)
            print(f"FAILED {name}: {str(e)[-600:]}")
    print(f"compiled {TARGET}: {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
