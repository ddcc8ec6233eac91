"""A bitwise fingerprint of each row of a tensor: equal bits, equal fingerprint (+0.0 and -0.0 differ).

The row's bits are read as 32-bit words (two bf16/fp16 values a word, an odd count of 16-bit values one
each, half an fp64 a word); word i times a fixed pseudo-random odd weight w_i, wrapped to 32 bits; the
products summed exactly in 64 bits. A changed bit changes its product, and an integer sum does not depend
on its order, so the fingerprint is the same on every device and batch layout, on the CPU (torch ops) and
on a GPU (one Triton kernel that reads the tensor once: a 16 x 512 prefill's logits of a 152k vocabulary
are 2.5 GB, where the torch form's temporaries cost several times the read). A difference goes unseen
only if the changed products cancel, about one chance in 2**32 per row.
"""
from __future__ import annotations

import torch

FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_WEIGHTS: dict = {}


def _words(x: torch.Tensor) -> torch.Tensor:
    """x's rows as 32-bit words [..., W] (int32)."""
    x = x.detach().contiguous()
    if x.element_size() == 2 and x.shape[-1] % 2:
        return x.view(torch.int16).to(torch.int32)
    return x.view(torch.int32)


def _weights(n: int, device: torch.device) -> torch.Tensor:
    key = (n, device)
    if key not in _WEIGHTS:
        g = torch.Generator().manual_seed(0x5EED + n)
        _WEIGHTS[key] = (torch.randint(-2**30, 2**30, (n,), generator=g, dtype=torch.int32) * 2 + 1).to(device)
    return _WEIGHTS[key]


def fingerprint_rows_torch(x: torch.Tensor) -> torch.Tensor:
    """The definition, in torch ops: the products formed exactly in int64, wrapped to int32 (a modular
    conversion), summed in int64 (at most 2**31 a term: no overflow below 2**32 words a row)."""
    words = _words(x)
    w = _weights(words.shape[-1], words.device)
    return (words.to(torch.int64) * w.to(torch.int64)).to(torch.int32).sum(-1, dtype=torch.int64)


def fingerprint_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., D] float -> [...] int64 (see the module docstring): one Triton kernel on a GPU, torch ops
    elsewhere; the same numbers."""
    if x.dtype not in FLOATS:
        raise ValueError(f"fingerprint_rows takes float16/bfloat16/float32/float64 rows, got {x.dtype}")
    if not x.is_cuda or x.numel() == 0:
        return fingerprint_rows_torch(x)
    from detmoe.diagnose._fingerprint_kernel import fingerprint_words
    words = _words(x)
    return fingerprint_words(words.reshape(-1, words.shape[-1]), _weights(words.shape[-1], words.device)
                             ).reshape(words.shape[:-1])
