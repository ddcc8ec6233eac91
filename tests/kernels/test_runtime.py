"""Where the kernels run (detmoe/kernels/runtime.py): importing detmoe changes nothing in the process; the
interpreter is switched on when the kernels are first needed, whatever imported triton before; without
triton the torch backend still works and the batch_invariant backend says why it cannot. Each case runs
in a fresh interpreter, since the switch is process-wide."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter switch only happens without CUDA")


def python(code: str) -> str:
    """stdout of `code` in a fresh python, TRITON_INTERPRET unset (as a user starts it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip()


def test_importing_detmoe_sets_no_variable_and_imports_no_triton():
    assert python("""
        import os, sys
        import detmoe, detmoe.moe, detmoe.kernels
        print(os.environ.get("TRITON_INTERPRET"), "triton" in sys.modules)
    """) == "None False"


@NO_CUDA
def test_kernels_run_whoever_imported_triton_first():
    """transformers (like torch.profiler and torch.compile) imports triton with the switch off: triton's
    library (tl.sum, tl.max, tl.cdiv) is then compiled-mode, and our interpreted kernels call it."""
    out = python("""
        import triton, triton.language
        import torch
        import detmoe as dm
        from detmoe.kernels.ops.rmsnorm import rms_norm
        from detmoe.kernels.ops.top_k import top_k
        x = torch.randn(5, 8)
        assert torch.equal(top_k(x, 3)[0], torch.sort(x, dim=1, descending=True, stable=True).indices[:, :3])
        print("ok", rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6).shape)
        model = dm.MoETransformer(dm.ModelConfig.from_name("tiny"))
        with dm.use_backend("batch_invariant"):
            print(len(dm.generate(model, [[1, 2, 3]], max_new_tokens=2)[0]))
    """)
    assert out == "ok torch.Size([2, 8])\n2"


def test_without_triton_the_torch_backend_works_and_batch_invariant_says_why():
    out = python("""
        import sys
        sys.modules["triton"] = None          # what an install without triton (not Linux) looks like
        import detmoe as dm
        model = dm.MoETransformer(dm.ModelConfig.from_name("tiny"))
        print(len(dm.generate(model, [[1, 2, 3]], max_new_tokens=2)[0]))
        try:
            with dm.use_backend("batch_invariant"):
                pass
        except ImportError as e:
            print(e)
    """)
    tokens, reason = out.split("\n")
    assert tokens == "2" and "need triton, which is not installed" in reason


def test_column_shards_of_a_product_get_the_whole_products_bits():
    """The interpreter's tl.dot sums K in one order fixed by K alone (numpy's matmul would pick its BLAS
    kernel by the block's N and by the CPU), so a rank's column shard of a weight gives the same bits as
    those columns of the whole product: dense, grouped, and the experts' fused SwiGLU, at random widths."""
    from detmoe.kernels.ops.grouped_gemm import grouped_matmul, grouped_swiglu
    from detmoe.kernels.ops.matmul import matmul
    from tests.kernels.conftest import DEVICE
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for _ in range(6):
        T, K = int(torch.randint(1, 70, (1,), generator=gen)), 16 * int(torch.randint(1, 9, (1,), generator=gen))
        W = int(torch.randint(2, 5, (1,), generator=gen))
        n = W * int(torch.randint(1, 40, (1,), generator=gen))          # columns of each shard: n / W
        x = torch.randn(T, K, generator=gen).to(DEVICE)
        w = torch.randn(K, n, generator=gen).to(DEVICE)
        ws = torch.randn(3, K, 2 * n, generator=gen).to(DEVICE)
        offsets = torch.sort(torch.randint(0, T + 1, (3,), generator=gen)).values.to(torch.int32).to(DEVICE)
        offsets[-1] = T
        whole, grouped, act = matmul(x, w), grouped_matmul(x, ws[..., :n].contiguous(), offsets), grouped_swiglu(x, ws, offsets)
        s = n // W
        for r in range(W):
            cols = slice(r * s, (r + 1) * s)
            assert torch.equal(matmul(x, w[:, cols].contiguous()), whole[:, cols]), (T, K, n, W)
            assert torch.equal(grouped_matmul(x, ws[:, :, cols].contiguous(), offsets), grouped[:, cols])
            gate_up = torch.cat([ws[:, :, cols], ws[:, :, n + r * s:n + (r + 1) * s]], dim=2).contiguous()
            assert torch.equal(grouped_swiglu(x, gate_up, offsets), act[:, cols])


@NO_CUDA
def test_threads_sharing_the_interpreted_backend_get_the_one_thread_bits(seed):
    """Triton's interpreter is not thread-safe (a launch patches triton.language process-wide): without the
    lock (runtime.serialised) 2 of 3 concurrent forwards failed. With it, every thread's logits are the bits
    one thread gets."""
    import threading

    from detmoe import kernels, moe
    from tests.conftest import random_prompts, tiny_config
    model = moe.MoETransformer(tiny_config("topk"))
    prompts = random_prompts(3, model.cfg.vocab_size, 2, 9)
    tokens, cu = moe.cu_seqlens_of(prompts, model.device)
    with kernels.use_backend("batch_invariant"):
        alone, _ = model(tokens, cu)
    start, results, errors = threading.Barrier(3), [None] * 3, []

    def forward(i: int) -> None:
        try:
            start.wait()   # all three inside the interpreter at once
            with kernels.use_backend("batch_invariant"):
                results[i] = [model(tokens, cu)[0] for _ in range(2)]
        except Exception as e:   # noqa: BLE001  (reported below, with the thread's number)
            errors.append(f"thread {i}: {e!r}")

    threads = [threading.Thread(target=forward, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert all(torch.equal(out, alone) for outs in results for out in outs)


@NO_CUDA
def test_fp8_and_integer_dots_keep_the_interpreters_own():
    """The fixed-order dot replaces float dots only: fp8 blocks (stored as bit patterns) and integer dots go
    to the interpreter's own, which decodes fp8 and sums integers exactly."""
    out = python("""
        import torch
        import detmoe.kernels.ops                      # prepares the interpreter
        import triton, triton.language as tl
        @triton.jit
        def k(a_ptr, b_ptr, c_ptr, OUT_INT: tl.constexpr):
            r = tl.arange(0, 16)
            a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
            b = tl.load(b_ptr + r[:, None] * 16 + r[None, :])
            c = tl.dot(a, b, out_dtype=tl.int32) if OUT_INT else tl.dot(a, b)
            tl.store(c_ptr + r[:, None] * 16 + r[None, :], c)
        for dt in (torch.float8_e5m2, torch.float8_e4m3fn):
            a, b, c = torch.randn(16, 16).to(dt), torch.randn(16, 16).to(dt), torch.empty(16, 16)
            k[(1,)](a, b, c, OUT_INT=False)
            print((c - a.float() @ b.float()).abs().max().item() < 1e-3)
        a, b = torch.randint(-128, 127, (16, 16), dtype=torch.int8), torch.randint(-128, 127, (16, 16), dtype=torch.int8)
        c = torch.empty(16, 16, dtype=torch.int32)
        k[(1,)](a, b, c, OUT_INT=True)
        print(torch.equal(c, a.int() @ b.int()))
    """)
    assert out.split() == ["True", "True", "True"], out
