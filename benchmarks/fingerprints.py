"""Do the batch-invariant kernels give the same bits on another GPU? SHA-256 fingerprints of the model's
fp32 logits for fixed configs and prompts, recorded once and recomputed on any GPU (tests/test_fingerprints.py).

    python -m benchmarks.fingerprints --out benchmarks/results/fingerprints/recorded/fingerprints.json

For each case of CASES (a preset, a dtype), under `kernels.use_backend("batch_invariant")`: a ragged
prefill of PROMPT_LENS tokens in one step, the decode step after it (one fixed token per sequence), and
the token ids of a greedy completion (`moe.generate`). Entries: `<case>/weights`, `/prefill` and `/decode`
(SHA-256 of the weights' and the fp32 logits' bytes), `<case>/greedy` (the ids). The JSON also records
the device (name, compute capability, SM count), the torch, CUDA and triton versions, the command, the date
and the git commit; meta.json beside it holds the run's record (detmoe/lab/run_meta.py).

Weights: not the preset's own draw. `MoETransformer.reset_parameters` draws on the model's device, and
PyTorch's CUDA sampling kernels give element i the Philox counter of the thread that writes it, in a
launch grid capped at SM count x (threads per SM / 256) blocks of 256 threads: a tensor of more values
than that grid has threads (132 x 2048 = 270,336 on an H100 SXM) gets other values on a card with another
SM count or threads per SM, and one of more than four values per thread also advances the generator's
offset by a grid-dependent amount, shifting every tensor drawn after it. `portable_fill_` draws the
weights instead from an integer hash of (config seed, parameter, element), converted to floats without
rounding: the same bits on every device, the CPU included (tests/test_fingerprints.py checks the CPU's
against the recorded file).
Not for: the stock `torch` backend (cuBLAS and SDPA choose kernels per GPU model), or multi-GPU layouts.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from detmoe import kernels
from detmoe import moe
from detmoe.lab.run_meta import run_meta, write_meta

RESULTS = Path(__file__).parent / "results" / "fingerprints" / "recorded" / "fingerprints.json"

# A ragged prefill: a one-token prompt, lengths across the attention's 64-key blocks and past its
# 512-key split, so the decode step after it takes the split schedule (detmoe/kernels/ops/attention.py).
PROMPT_LENS = (1, 7, 33, 130, 600)
GREEDY_TOKENS = 16
PROMPT_SALT, DECODE_SALT = 0x2545F491, 0x1B873593


@dataclasses.dataclass(frozen=True)
class Case:
    preset: str    # moe.ModelConfig.from_name
    dtype: str     # moe.config DTYPES

    @property
    def name(self) -> str:
        return f"{self.preset}-{self.dtype}"

    def config(self) -> moe.ModelConfig:
        return moe.ModelConfig.from_name(self.preset, dtype=self.dtype)


CASES = (Case("small", "float32"), Case("small", "bfloat16"), Case("large", "bfloat16"))


# ---------------------------------------------------------------------------------------------------
# Portable integers: every value below is exact integer arithmetic (values < 2**32 times odd constants
# < 2**31, so no product reaches 2**63), the same for Python ints and int64 tensors on any device.

_MASK = 0xFFFFFFFF
_M1, _M2 = 0x7FEB352D, 0x2C1B3C6D


def mix32(x):
    """A 32-bit integer hash (xorshift-multiply rounds) of x in [0, 2**32): a Python int or an int64 tensor."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK
    return x ^ (x >> 16)


def prompts(vocab_size: int) -> list[list[int]]:
    """The ragged prefill batch: sequence b has PROMPT_LENS[b] token ids in 0..vocab_size-1."""
    return [[mix32(mix32((b << 16) + i) ^ PROMPT_SALT) % vocab_size for i in range(n)]
            for b, n in enumerate(PROMPT_LENS)]


def decode_tokens(vocab_size: int) -> list[int]:
    """One token per sequence for the decode step after the prefill."""
    return [mix32(mix32(b) ^ DECODE_SALT) % vocab_size for b in range(len(PROMPT_LENS))]


@torch.no_grad()
def portable_fill_(model: moe.MoETransformer, chunk: int = 1 << 24) -> None:
    """Overwrite the weights with uniform values in [-s, s) (s: the power of two nearest sqrt(3) * init_std,
    the std of the preset's normal draw) from an integer hash of (cfg.seed, parameter index, element
    index); norms stay ones. h >> 8 is a 24-bit integer, exact in fp32, and the scale a power of two, so
    the float values are exact; the cast to the model's dtype rounds to nearest even on every device."""
    cfg = model.cfg
    scale = 2.0 ** round(math.log2(math.sqrt(3) * cfg.init_std)) / 2 ** 23
    for p_index, (name, p) in enumerate(model.named_parameters()):
        if name.endswith("norm"):
            p.fill_(1.0)
            continue
        salt = mix32((cfg.seed * 1009 + p_index) & _MASK)
        flat = p.view(-1)
        for start in range(0, flat.numel(), chunk):
            end = min(start + chunk, flat.numel())
            i = torch.arange(start, end, device=p.device, dtype=torch.int64)
            h = mix32(mix32(i) ^ salt)
            flat[start:end].copy_(((h >> 8) - 2 ** 23).to(torch.float32) * scale)


# ---------------------------------------------------------------------------------------------------
# Fingerprints


def fingerprint(t: torch.Tensor) -> str:
    """SHA-256 (hex) of an fp32 tensor's bytes in row-major order, little-endian as every CUDA host stores them."""
    if t.dtype != torch.float32:
        raise ValueError(f"t must be float32 (the model's logits), got {t.dtype}")
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def weights_fingerprint(model: moe.MoETransformer) -> str:
    """SHA-256 of every parameter's bytes in its own dtype, in named_parameters order."""
    h = hashlib.sha256()
    for _, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        as_int = {2: torch.int16, 4: torch.int32}[p.element_size()]
        for start in range(0, flat.numel(), 1 << 26):   # a few hundred MB on the host at a time
            h.update(flat[start:start + (1 << 26)].view(as_int).cpu().numpy().tobytes())
    return h.hexdigest()


def case_entries(case: Case, device: str, greedy_tokens: int = GREEDY_TOKENS) -> dict[str, Any]:
    """The fingerprints of one case on `device` (CUDA, or the CPU's Triton interpreter)."""
    model = moe.MoETransformer(case.config(), device=device)
    portable_fill_(model)
    V = model.cfg.vocab_size
    batch = prompts(V)
    entries: dict[str, Any] = {f"{case.name}/weights": weights_fingerprint(model)}
    with kernels.use_backend("batch_invariant"):
        cache = model.new_cache(len(batch), max(PROMPT_LENS) + 1)
        tokens, cu = moe.cu_seqlens_of(batch, model.device)
        logits, _ = model(tokens, cu, cache)                                          # [T, V]
        entries[f"{case.name}/prefill"] = fingerprint(logits)
        step = torch.tensor(decode_tokens(V), device=model.device)
        logits, _ = model(step, torch.arange(len(batch) + 1, device=model.device), cache)   # [B, V]
        entries[f"{case.name}/decode"] = fingerprint(logits)
        entries[f"{case.name}/greedy"] = moe.generate(model, batch, greedy_tokens)
    del model, cache
    if device == "cuda":
        torch.cuda.empty_cache()
    return entries


def environment(device: str) -> dict[str, Any]:
    import triton
    env = dict(device=device, torch=torch.__version__, triton=triton.__version__, python=platform.python_version())
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   sm_count=props.multi_processor_count, cuda=torch.version.cuda)
    else:
        env.update(device_name=platform.processor() or platform.machine())
    return env


def compute(cases: tuple[Case, ...] = CASES, device: str = "cuda", greedy_tokens: int = GREEDY_TOKENS) -> dict:
    """{"meta": the environment, "inputs": each case's prompts and decode tokens, "entries": fingerprints}."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' needs a CUDA GPU; use device='cpu' (Triton's interpreter) for a dry run")
    entries: dict[str, Any] = {}
    inputs: dict[str, Any] = {}
    for case in cases:
        V = case.config().vocab_size
        inputs[case.name] = dict(prompts=prompts(V), decode_tokens=decode_tokens(V), greedy_tokens=greedy_tokens)
        entries.update(case_entries(case, device, greedy_tokens))
    return dict(meta=environment(device), inputs=inputs, entries=entries)


def compare(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per entry that is missing on either side or differs (greedy: where it first departs)."""
    problems = [f"{key}: recorded, not computed now" for key in recorded if key not in current]
    problems += [f"{key}: computed now, not in the recorded file" for key in current if key not in recorded]
    for key in (k for k in recorded if k in current and recorded[k] != current[k]):
        if key.endswith("/greedy"):
            for b, (old, new) in enumerate(zip(recorded[key], current[key])):
                first = next((i for i, (x, y) in enumerate(zip(old, new)) if x != y), min(len(old), len(new)))
                if old != new:
                    problems.append(f"{key}: sequence {b} departs at token {first}: recorded {old[first:first + 4]}, "
                                    f"now {new[first:first + 4]}")
        else:
            problems.append(f"{key}: recorded {str(recorded[key])[:16]}..., now {str(current[key])[:16]}...")
    return problems


def dumps(result: dict) -> str:
    """JSON with one line per entry (lists of token ids stay on their entry's line)."""
    def block(d: dict, indent: str) -> str:
        lines = [f"{indent} {json.dumps(k)}: " + (block(v, indent + " ") if isinstance(v, dict) and indent == ""
                                                  else json.dumps(v)) for k, v in d.items()]
        return "{\n" + ",\n".join(lines) + "\n" + indent + "}"
    return block(result, "") + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"JSON file (default {RESULTS})")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a dry run under Triton's interpreter (slow; its bits are not the GPU's)")
    ap.add_argument("--cases", nargs="+", choices=[c.name for c in CASES], help="a subset of CASES")
    args = ap.parse_args(argv)
    cases = tuple(c for c in CASES if args.cases is None or c.name in args.cases)
    meta = run_meta(command=shlex.join(["python", "-m", "benchmarks.fingerprints"]
                                       + (sys.argv[1:] if argv is None else argv)), device=args.device)
    result = compute(cases, args.device)
    result["meta"].update({k: meta[k] for k in ("command", "date", "git_commit")})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dumps(result))
    write_meta(args.out.parent, meta)
    print(json.dumps(dict(meta=result["meta"], entries={k: v for k, v in result["entries"].items()
                                                        if not k.endswith("/greedy")}), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
