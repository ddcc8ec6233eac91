"""Bits across GPU models: the fingerprints of benchmarks/fingerprints.py recomputed on this GPU and compared
with benchmarks/results/fingerprints/recorded/fingerprints.json (gpu); on the CPU, the pieces they are made
of: the hash, the portable weights, the fixed prompts, and a dry run under Triton's interpreter."""
import hashlib
import json
import struct

import pytest
import torch

from detmoe import moe
from benchmarks import fingerprints as fp

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"   # of b"" (FIPS 180-4)


def test_fingerprint_is_the_sha256_of_the_row_major_fp32_bytes():
    assert fp.fingerprint(torch.empty(0)) == EMPTY_SHA256
    t = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1e-30, -7.25]])
    assert fp.fingerprint(t) == hashlib.sha256(struct.pack("<6f", 1.0, -2.0, 0.5, 3.0, 1e-30, -7.25)).hexdigest()
    assert fp.fingerprint(t.t()) == hashlib.sha256(struct.pack("<6f", 1.0, 3.0, -2.0, 1e-30, 0.5, -7.25)).hexdigest()
    assert fp.fingerprint(torch.tensor([0.0])) != fp.fingerprint(torch.tensor([-0.0]))   # bits, not values
    with pytest.raises(ValueError, match="float32"):
        fp.fingerprint(t.to(torch.bfloat16))


def test_mix32_on_tensors_is_the_python_int_function():
    xs = [0, 1, 2, 255, 65535, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1] + torch.randint(0, 2**32, (64,)).tolist()
    assert fp.mix32(torch.tensor(xs, dtype=torch.int64)).tolist() == [fp.mix32(x) for x in xs]
    assert all(0 <= fp.mix32(x) < 2**32 for x in xs)
    assert len(set(fp.mix32(torch.arange(1 << 16)).tolist())) == 1 << 16   # a bijection: no collisions


def test_prompts_and_cases_are_fixed():
    for V in (256, 512, 32768):
        batch = fp.prompts(V)
        assert batch == fp.prompts(V) and tuple(map(len, batch)) == fp.PROMPT_LENS
        assert all(0 <= t < V for seq in batch for t in seq)
        assert fp.decode_tokens(V) == fp.decode_tokens(V) and len(fp.decode_tokens(V)) == len(fp.PROMPT_LENS)
    assert len(set(map(tuple, fp.prompts(32768)))) == len(fp.PROMPT_LENS)
    assert len({c.name for c in fp.CASES}) == len(fp.CASES)
    for case in fp.CASES:
        assert case.config() == case.config() and case.config().dtype == case.dtype
        assert max(fp.PROMPT_LENS) + fp.GREEDY_TOKENS <= case.config().max_seq_len


def test_portable_weights_follow_the_hash_exactly():
    cfg = moe.ModelConfig.from_name("tiny", seed=int(torch.randint(0, 2**20, ())))
    model = moe.MoETransformer(cfg)
    fp.portable_fill_(model)
    s = 2.0 ** round(torch.tensor(3.0).sqrt().mul(cfg.init_std).log2().item())   # 2**-5 for init_std 0.02
    for p_index, (name, p) in enumerate(model.named_parameters()):
        if name.endswith("norm"):
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        assert p.min() >= -s and p.max() < s and p.std() > s / 4, name
        # the slow reference, element by element, in Python ints
        salt = fp.mix32((cfg.seed * 1009 + p_index) & 0xFFFFFFFF)
        flat = p.view(-1)
        for j in torch.randint(0, flat.numel(), (8,)).tolist() + [0, flat.numel() - 1]:
            h = fp.mix32(fp.mix32(j) ^ salt)
            assert flat[j].item() == ((h >> 8) - 2**23) * s / 2**23, (name, j)


def test_portable_weights_do_not_depend_on_dtype_chunking_or_the_global_rng():
    cfg = moe.ModelConfig.from_name("tiny", seed=3)
    a, b = moe.MoETransformer(cfg), moe.MoETransformer(cfg)
    torch.manual_seed(0)
    fp.portable_fill_(a)
    torch.manual_seed(1)
    fp.portable_fill_(b, chunk=1000)
    half = moe.MoETransformer(moe.ModelConfig.from_name("tiny", seed=3, dtype="bfloat16"))
    fp.portable_fill_(half)
    other = moe.MoETransformer(moe.ModelConfig.from_name("tiny", seed=4))
    fp.portable_fill_(other)
    for (name, pa), pb, ph, po in zip(a.named_parameters(), b.parameters(), half.parameters(), other.parameters()):
        assert torch.equal(pa, pb), name
        assert torch.equal(pa.to(torch.bfloat16), ph), name
        assert name.endswith("norm") or not torch.equal(pa, po), name
    assert fp.weights_fingerprint(a) == fp.weights_fingerprint(b) != fp.weights_fingerprint(other)


def test_compare_names_every_difference():
    recorded = {"a/prefill": "00", "a/decode": "11", "a/greedy": [[1, 2, 3], [4, 5]], "gone/prefill": "22"}
    current = {"a/prefill": "00", "a/decode": "12", "a/greedy": [[1, 9, 3], [4, 5]], "new/prefill": "33"}
    problems = fp.compare(recorded, current)
    assert len(problems) == 4
    assert any(p.startswith("a/decode:") for p in problems)
    assert any(p.startswith("a/greedy: sequence 0 departs at token 1") for p in problems)
    assert any(p.startswith("gone/prefill: recorded, not computed") for p in problems)
    assert any(p.startswith("new/prefill: computed now, not in") for p in problems)
    assert fp.compare(recorded, dict(recorded)) == []


def test_dry_run_on_the_cpu_repeats_itself(monkeypatch):
    """The whole script on the CPU (Triton's interpreter, tiny preset, short prompts): every entry, twice
    the same. Its bits are the interpreter's, not a GPU's."""
    monkeypatch.setattr(fp, "PROMPT_LENS", (1, 5, 12))
    cases = (fp.Case("tiny", "float32"),)
    first, second = fp.compute(cases, "cpu", greedy_tokens=3), fp.compute(cases, "cpu", greedy_tokens=3)
    assert first["entries"] == second["entries"]
    assert sorted(first["entries"]) == [f"tiny-float32/{k}" for k in ("decode", "greedy", "prefill", "weights")]
    assert all(len(first["entries"][f"tiny-float32/{k}"]) == 64 for k in ("decode", "prefill", "weights"))
    greedy = first["entries"]["tiny-float32/greedy"]
    assert len(greedy) == 3 and all(len(g) == 3 for g in greedy)
    assert first["inputs"]["tiny-float32"]["prompts"] == fp.prompts(256)
    assert json.loads(fp.dumps(first)) == first


@pytest.mark.slow
def test_recorded_inputs_and_weights_are_this_machines():
    """The recorded file's prompts and (for the small preset) weights are the ones this CPU makes: the inputs
    do not depend on the device that made the file."""
    if not fp.RESULTS.exists():
        pytest.skip(f"{fp.RESULTS} not recorded yet (python -m benchmarks.fingerprints on a GPU)")
    recorded = json.loads(fp.RESULTS.read_text())
    for case in fp.CASES:
        V = case.config().vocab_size
        assert recorded["inputs"][case.name]["prompts"] == fp.prompts(V), case.name
        assert recorded["inputs"][case.name]["decode_tokens"] == fp.decode_tokens(V), case.name
        if case.preset == "small":
            model = moe.MoETransformer(case.config())
            fp.portable_fill_(model)
            assert recorded["entries"][f"{case.name}/weights"] == fp.weights_fingerprint(model), case.name


@pytest.mark.gpu
def test_fingerprints_match_the_recorded_file():
    """Every fingerprint of benchmarks/results/fingerprints/recorded/fingerprints.json, recomputed on this GPU,
    bit for bit."""
    assert fp.RESULTS.exists(), (f"{fp.RESULTS} is missing: record it with `python -m benchmarks.fingerprints` "
                                 "on a GPU (then this test compares every other GPU with it)")
    recorded = json.loads(fp.RESULTS.read_text())
    current = fp.compute(fp.CASES, "cuda")
    problems = fp.compare(recorded["entries"], current["entries"])
    keys = ("device_name", "capability", "sm_count", "torch", "cuda", "triton")
    was = ", ".join(f"{k}={recorded['meta'].get(k)}" for k in keys)
    now = ", ".join(f"{k}={current['meta'].get(k)}" for k in keys)
    assert not problems, (f"{len(problems)} of {len(recorded['entries'])} entries differ\n  recorded on: {was}\n"
                          f"  now on:      {now}\n  " + "\n  ".join(problems))
