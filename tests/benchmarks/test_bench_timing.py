"""bench_timing on the CPU: a failing variant is recorded with its error's first line, the others are
timed once per round."""
import torch

from benchmarks.bench_timing import Settings, measure
from benchmarks.roofline import DeviceBounds


def test_a_failing_variant_is_recorded_and_the_others_run():
    def broken():
        raise RuntimeError("CUDA out of memory.\nsecond line")
    status = {}
    settings = Settings(DeviceBounds(1.0, 1.0, "given"), rounds=2)
    timed = measure({("torch", "off"): lambda: None, ("torch", "on"): broken}, status, settings, torch.device("cpu"))
    assert status == {("torch", "on"): "failed: RuntimeError: CUDA out of memory."}
    assert list(timed) == [("torch", "off")] and len(timed[("torch", "off")][0]) == 2
    assert timed[("torch", "off")][1] is None   # no GPU busy time on a CPU
