"""`invariant_mode()` itself (detmoe/invariant/mode.py, fallback.py): importing detmoe registers nothing and
sets no environment variable; the overrides are in PyTorch's dispatcher only inside the block (and nested
blocks, and while any thread is inside one), gone after it, also when it raises; a call the mode cannot
run raises NotInvariantError under strict=True and otherwise warns once per (op, reason) and gives
PyTorch's result; bad arguments are named."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch

import detmoe
from detmoe.invariant import aten_ops, fallback, mode
from tests.invariant.conftest import assert_same_bits

OPS = sorted({f"aten::{name}" for name, _, _ in aten_ops.OVERRIDES})

def cpu_kernel_from_python(op: str) -> bool:
    """Is op's CPU kernel in PyTorch's dispatch table one registered from Python (an override)?"""
    for line in torch._C._dispatch_dump(op).splitlines():
        if line.startswith("CPU:"):
            return ".py:" in line
    return False


def overridden() -> list[str]:
    return [op for op in OPS if cpu_kernel_from_python(op)]


def float64_mm() -> torch.Tensor:
    """A call the mode cannot run: its kernels take float16/bfloat16/float32."""
    a = torch.arange(12, dtype=torch.float64).view(3, 4)
    return torch.mm(a, a.t())


def assert_pytorchs_kernels_back() -> None:
    __tracebackhide__ = True
    assert not detmoe.invariant.active() and not fallback.strict() and mode._library is None
    assert overridden() == []
    assert torch.equal(float64_mm(), torch.tensor([[14., 38, 62], [38, 126, 214], [62, 214, 366]],
                                                  dtype=torch.float64))


def test_importing_detmoe_registers_nothing_and_sets_no_environment_variable():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # as a user's shell would have it
    script = inspect.getsource(cpu_kernel_from_python) + textwrap.dedent(f'''
        import os, sys
        before = dict(os.environ)
        import detmoe, detmoe.invariant, torch
        from detmoe.invariant import aten_ops     # the overrides' module too: defined, not registered
        assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
        assert not detmoe.invariant.active()
        ops = {OPS!r}
        assert {{"aten::mm", "aten::_grouped_mm", "aten::scaled_dot_product_attention", "aten::silu"}} <= set(ops)
        assert not [op for op in ops if cpu_kernel_from_python(op)]
        a = torch.randn(3, 4, dtype=torch.float64)
        detmoe.invariant.fallback.set_strict_entries(1)   # were an override registered, it would raise here
        torch.mm(a, a.t()); a.sum(-1); torch.softmax(a, -1); torch.topk(a, 2)
        with detmoe.invariant_mode():
            assert sorted(op for op in ops if cpu_kernel_from_python(op)) == ops
        print("ok")
    ''')
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_overrides_are_in_the_dispatcher_only_inside_the_block():
    assert_pytorchs_kernels_back()
    with detmoe.invariant_mode():
        assert detmoe.invariant.active()
        assert overridden() == OPS
    assert_pytorchs_kernels_back()


def test_strict_raises_where_the_mode_would_fall_back_and_the_call_works_outside():
    want = float64_mm()
    with detmoe.invariant_mode(strict=True):
        with pytest.raises(detmoe.NotInvariantError, match=r"aten::mm.*float64"):
            float64_mm()
        with pytest.raises(detmoe.NotInvariantError, match="aten::sum"):
            torch.randn(3, 4, dtype=torch.float64).sum(-1)
    assert torch.equal(float64_mm(), want)


def test_non_strict_warns_once_per_op_and_reason_and_gives_pytorchs_result(seed):
    a, b = torch.randn(5, 6, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    i, j = torch.randint(-9, 9, (5, 6)), torch.randint(-9, 9, (6, 3))
    fallback.forget_warnings()
    with warnings.catch_warnings(record=True) as caught, detmoe.invariant_mode():
        warnings.simplefilter("always")                # every warning the mode emits reaches the list
        got = [torch.mm(a, b) for _ in range(3)] + [a.sum(-1) for _ in range(2)] + [torch.mm(i, j)] * 2
    ours = [str(w.message) for w in caught if issubclass(w.category, detmoe.InvariantModeWarning)]
    assert len(ours) == 3, ours                        # (mm, float64), (sum, float64), (mm, int64)
    assert sum("aten::mm" in m and "float64" in m for m in ours) == 1
    assert sum("aten::sum" in m and "float64" in m for m in ours) == 1
    assert sum("aten::mm" in m and "int64" in m for m in ours) == 1
    want = [torch.mm(a, b)] * 3 + [a.sum(-1)] * 2 + [torch.mm(i, j)] * 2
    for g, w in zip(got, want):
        assert_same_bits(g, w, "the fallback against PyTorch outside the mode")
    # forgotten: warned again; remembered: not
    with warnings.catch_warnings(record=True) as again, detmoe.invariant_mode():
        warnings.simplefilter("always")
        torch.mm(a, b)
        fallback.forget_warnings()
        torch.mm(a, b)
    assert len([w for w in again if issubclass(w.category, detmoe.InvariantModeWarning)]) == 1


def test_leaving_an_inner_block_keeps_the_outer_blocks_overrides_and_strictness():
    with detmoe.invariant_mode(strict=True):
        with detmoe.invariant_mode():
            pass
        assert detmoe.invariant.active() and overridden() == OPS
        with pytest.raises(detmoe.NotInvariantError):
            float64_mm()
    assert_pytorchs_kernels_back()
    fallback.forget_warnings()
    with detmoe.invariant_mode():
        with detmoe.invariant_mode(strict=True):
            with pytest.raises(detmoe.NotInvariantError):
                float64_mm()
        # the inner strict block is gone: the outer one warns and runs PyTorch's kernel
        assert detmoe.invariant.active() and overridden() == OPS
        with pytest.warns(detmoe.InvariantModeWarning):
            float64_mm()
    assert_pytorchs_kernels_back()


def test_an_exception_inside_restores_pytorchs_kernels():
    class Boom(Exception):
        pass
    with pytest.raises(Boom):
        with detmoe.invariant_mode(strict=True):
            with detmoe.invariant_mode():
                raise Boom()
    assert_pytorchs_kernels_back()
    # the mode's own error, raised from inside an override
    with pytest.raises(detmoe.NotInvariantError):
        with detmoe.invariant_mode(strict=True):
            float64_mm()
    assert_pytorchs_kernels_back()


@pytest.mark.parametrize("kwargs,name", [(dict(strict="yes"), "strict"), (dict(strict=1), "strict"),
                                         (dict(model=3), "model"), (dict(model=torch.randn(2)), "model")])
def test_bad_arguments_raise_value_error_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        with detmoe.invariant_mode(**kwargs):
            pass
    assert_pytorchs_kernels_back()


def test_threads_entering_and_leaving_concurrently_leave_no_override_and_get_the_same_bits(seed):
    x, w = torch.randn(7, 40), torch.randn(40, 24)
    with detmoe.invariant_mode(strict=True):
        want = torch.mm(x, w)
    rounds, results, errors = 25, [], []
    start = threading.Barrier(2)

    def work():
        try:
            start.wait()
            for _ in range(rounds):
                with detmoe.invariant_mode(strict=True):
                    assert detmoe.invariant.active()
                    results.append(torch.mm(x, w))
                with detmoe.invariant_mode():
                    pass
        except BaseException as e:            # noqa: BLE001 (reported below, in the main thread)
            errors.append(e)
    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert len(results) == 2 * rounds
    for r in results:
        assert_same_bits(r, want, "a thread's mm inside the mode against the main thread's")
    assert_pytorchs_kernels_back()
