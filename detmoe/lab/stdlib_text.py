"""Training text every Python install has: the standard library's own `.py` sources (code and docstrings),
as bytes (vocab 256), in a fixed file order, split into train and held-out validation by file.

Test suites, third-party packages and caches are left out: they are not ordinary library code, and
site-packages differs from machine to machine. The corpus does depend on the Python version, so a
training run records which one it read.
"""
from __future__ import annotations

import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
SEPARATOR = b"\n\n"  # between files, so a window that spans two files still reads as source


@dataclass
class Corpus:
    train: torch.Tensor   # [N_train] uint8 bytes
    val: torch.Tensor     # [N_val] uint8 bytes
    n_files: int
    python: str           # the version whose stdlib this is

    def unigram_loss(self) -> float:
        """Cross-entropy (nats/byte) of the validation bytes under the training bytes' unigram
        distribution (add-one smoothed): the baseline a trained model must beat clearly."""
        counts = torch.bincount(self.train.long(), minlength=256).double() + 1.0
        logp = (counts / counts.sum()).log()
        return float(-logp[self.val.long()].mean())


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The stdlib's .py files in sorted (deterministic) order, without tests and third-party code."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not EXCLUDED_DIRS & set(p.relative_to(root).parts))
    if not files:
        raise ValueError(f"root={str(root)!r} holds no .py files")
    return files


def load_corpus(max_bytes: int = 0, val_every: int = 10, root: Path | None = None) -> Corpus:
    """Every val_every-th file (by sorted path) is held out for validation. max_bytes > 0 stops reading
    once that many bytes are in hand (small corpora for tests); 0 reads everything."""
    if val_every < 2:
        raise ValueError(f"val_every must be >= 2, got {val_every}")
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    train, val, total, n = [], [], 0, 0
    for i, path in enumerate(stdlib_files(root)):
        data = path.read_bytes() + SEPARATOR
        (val if i % val_every == 0 else train).append(data)
        total, n = total + len(data), n + 1
        if max_bytes and total >= max_bytes:
            break
    if not train or not val:
        raise ValueError(f"max_bytes={max_bytes} is too small for a train and a validation split")
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)
    return Corpus(as_tensor(train), as_tensor(val), n, platform.python_version())


def random_windows(data: torch.Tensor, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[n, length] windows of data at random offsets drawn from `generator` (int64 token ids)."""
    if data.numel() <= length:
        raise ValueError(f"length={length} must be shorter than the data ({data.numel()} bytes)")
    starts = torch.randint(0, data.numel() - length, (n,), generator=generator)
    return data[starts[:, None] + torch.arange(length)].long()


def even_windows(data: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """[n, length] windows spread evenly over data: a fixed validation set."""
    if data.numel() <= length:
        raise ValueError(f"length={length} must be shorter than the data ({data.numel()} bytes)")
    starts = torch.linspace(0, data.numel() - length - 1, n).long()
    return data[starts[:, None] + torch.arange(length)].long()
