"""Padding-invariant attention (detmoe/invariant/attention.py), called directly (`allowed_from_mask` then
`padded_attention`) and through F.scaled_dot_product_attention inside `invariant_mode()`: a prompt's real
queries get the bits they get alone, left- or right-padded in batches of 1 to 64 other random requests at a
random row, with masks built as transformers' sdpa path builds them; a decode step gets the bits of the last
row of the whole sequence's prefill; GQA and head dims 16 and 24 too. Masks that are not causal attention
over padded rows (sliding windows, per-head masks, biases, is_causal with a mask, bidirectional attention)
are refused, and inside the mode they fall back to PyTorch (strict: NotInvariantError)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import detmoe
from detmoe.invariant import fallback
from detmoe.invariant.attention import allowed_from_mask, padded_attention
from tests.invariant.conftest import additive, assert_same_bits, pad_batch, padding_mask, real_positions

MAX_LEN = 20


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


def attend(q, k, v, mask, path: str, is_causal: bool = False):
    """Attention of padded q [B, H, Sq, D] over k, v [B, Hkv, Sk, D] with SDPA's (mask, is_causal), through
    the mode's F.scaled_dot_product_attention (strict: no fallback) or padded_attention directly."""
    B, H, Sq, D = q.shape
    if path == "direct":
        allowed, why = allowed_from_mask(mask, is_causal, B, Sq, k.shape[2])
        assert why is None, why
        out = padded_attention(q, k, v, allowed, D ** -0.5)
        assert out is not None, "padded_attention refused a causal padding mask"
        return out
    with detmoe.invariant_mode(strict=True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              enable_gqa=k.shape[1] != H)


def request(L: int, H: int, Hkv: int, D: int, dtype=torch.float32):
    return randn(H, L, D, dtype=dtype), randn(Hkv, L, D, dtype=dtype), randn(Hkv, L, D, dtype=dtype)


def assert_prompt_bits_in_padded_batches(B: int, side: str, path: str, mask_kind: str, H: int, Hkv: int, D: int,
                                         dtype=torch.float32) -> None:
    __tracebackhide__ = True
    L = int(torch.randint(1, MAX_LEN + 1, ()))
    q1, k1, v1 = request(L, H, Hkv, D, dtype)
    alone = attend(q1[None], k1[None], v1[None], None, "sdpa", is_causal=True)[0]
    # alone with its (all-real) mask: the same bits
    assert_same_bits(attend(q1[None], k1[None], v1[None], padding_mask([L], L, L, side), path)[0], alone,
                     "alone with a mask against is_causal")
    lengths = torch.randint(1, MAX_LEN + 1, (B,)).tolist()
    row = int(torch.randint(0, B, ()))
    lengths[row] = L
    reqs = [request(n, H, Hkv, D, dtype) for n in lengths]
    reqs[row] = (q1, k1, v1)
    q, k, v = (pad_batch([r[i] for r in reqs], side) for i in range(3))
    S = q.shape[2]
    mask = padding_mask(lengths, S, S, side)
    if mask_kind == "additive":
        mask = additive(mask, dtype)
    out = attend(q, k, v, mask, path)
    assert_same_bits(out[row][:, real_positions(L, S, side)], alone,
                     f"a {L}-token prompt at row {row} of a {side}-padded batch of {B} (length {S}) against alone")


@pytest.mark.parametrize("B", [1, 2, 7, 64])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("path,mask_kind", [("direct", "bool"), ("sdpa", "bool"), ("sdpa", "additive")])
def test_prompt_real_queries_have_the_alone_bits_in_any_padded_batch(seed, B, side, path, mask_kind):
    assert_prompt_bits_in_padded_batches(B, side, path, mask_kind, H=2, Hkv=2, D=16)


@pytest.mark.parametrize("D,dtype", [(16, torch.float32), (24, torch.float32), (24, torch.bfloat16)])
@pytest.mark.parametrize("side", ["left", "right"])
def test_gqa_prompt_has_the_alone_bits_in_a_padded_batch(seed, D, dtype, side):
    assert_prompt_bits_in_padded_batches(7, side, "sdpa", "bool", H=4, Hkv=2, D=D, dtype=dtype)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("path,mask_kind", [("direct", "bool"), ("sdpa", "bool"), ("sdpa", "additive")])
@pytest.mark.parametrize("H,Hkv,D", [(2, 2, 16), (4, 2, 24)])
def test_decode_step_has_the_bits_of_the_last_prefill_row(seed, side, path, mask_kind, H, Hkv, D):
    N = int(torch.randint(2, MAX_LEN + 1, ()))
    q1, k1, v1 = request(N, H, Hkv, D)
    prefill = attend(q1[None], k1[None], v1[None], None, "sdpa", is_causal=True)[0]
    last = prefill[:, -1:]
    # alone: one query over its cache, no mask
    assert_same_bits(attend(q1[None, :, -1:], k1[None], v1[None], None, path)[0], last, "decode alone, no mask")
    B = 7
    lengths = torch.randint(1, MAX_LEN + 5, (B,)).tolist()
    row = int(torch.randint(0, B, ()))
    lengths[row] = N
    caches = [request(n, H, Hkv, D) for n in lengths]
    caches[row] = (q1, k1, v1)
    k, v = (pad_batch([c[i] for c in caches], side) for i in (1, 2))
    q = torch.stack([c[0][:, -1:] for c in caches])                   # each request's newest token
    Sk = k.shape[2]
    mask = padding_mask(lengths, 1, Sk, side) if side == "left" else \
        torch.stack([torch.arange(Sk) < n for n in lengths])[:, None, None]
    if mask_kind == "additive":
        mask = additive(mask, torch.float32)
    out = attend(q, k, v, mask, path)
    assert_same_bits(out[row], last, f"decode at row {row} of a {side}-padded batch of {B} against prefill's last")


def test_decode_with_a_mask_broadcast_over_queries_and_batch(seed):
    """A [1, 1, 1, Sk] mask (all keys real) and a [B, 1, 1, Sk] one give the same decode bits."""
    H, D, N = 2, 16, int(torch.randint(2, MAX_LEN + 1, ()))
    q1, k1, v1 = request(N, H, H, D)
    last = attend(q1[None], k1[None], v1[None], None, "sdpa", is_causal=True)[0][:, -1:]
    ones = torch.ones(1, 1, 1, N, dtype=torch.bool)
    got = attend(q1[None, :, -1:], k1[None], v1[None], ones, "sdpa")[0]
    assert_same_bits(got, last, "decode with a broadcast mask")


# --- SDPA's is_causal when queries and keys differ in number ---------------------------------------------

def test_is_causal_with_fewer_queries_than_keys_is_top_left_as_in_pytorch(seed):
    """SDPA's is_causal aligns queries to the top left: one query over 5 keys sees key 0 only."""
    q, k, v = randn(2, 2, 1, 16), randn(2, 2, 5, 16), randn(2, 2, 5, 16)
    q3 = randn(2, 2, 3, 16)
    with detmoe.invariant_mode(strict=True):
        one = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        three = F.scaled_dot_product_attention(q3, k, v, is_causal=True)
    torch.testing.assert_close(one, v[:, :, :1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(three, F.scaled_dot_product_attention(q3, k, v, is_causal=True), rtol=1e-5,
                               atol=1e-6)


def test_is_causal_with_more_queries_than_keys_runs_on_the_override_with_pytorchs_values(seed):
    """Queries past the last key all see every key: they get PyTorch's values (not zeros, as if they were
    padding), on the override (strict), and each query the bits it gets alone."""
    q, k, v = randn(2, 2, 6, 16), randn(2, 2, 3, 16), randn(2, 2, 3, 16)
    allowed, why = allowed_from_mask(None, True, 2, 6, 3)
    assert why is None
    with detmoe.invariant_mode(strict=True):
        got = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        for i in (2, 3, 5):      # query i alone over all 3 keys
            assert_same_bits(F.scaled_dot_product_attention(q[:, :, i:i + 1], k, v)[:, :, 0], got[:, :, i],
                             f"query {i} of 6 over 3 keys against alone")
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-5,
                               atol=1e-6)


# --- refused masks ---------------------------------------------------------------------------------------

B_, H_, S_, D_ = 3, 2, 9, 16


def _causal(S: int = S_) -> torch.Tensor:
    return torch.ones(S, S, dtype=torch.bool).tril()


def _refused():
    """(name, attn_mask, is_causal, where it is refused: "allowed_from_mask" or "padded_attention")."""
    window = _causal() & ~torch.ones(S_, S_, dtype=torch.bool).tril(-3)        # each query: its last 3 keys
    per_head = padding_mask([S_, 4, 7], S_, S_, "left").expand(B_, H_, S_, S_).clone()
    per_head[1, 1, -1, -2] = False                                             # one head of one row differs
    bias = additive(padding_mask([S_, 4, 7], S_, S_, "left"), torch.float32)
    bias[0, 0, 5, 2] = -0.5                                                    # a bias, not a mask
    documents = torch.zeros(S_, S_, dtype=torch.bool)                          # two packed documents
    documents[:4, :4], documents[4:, 4:] = _causal(4), _causal(S_ - 4)
    future = _causal().clone()
    future[2, 5] = True                                                        # a query sees a later key
    return [("sliding window", window[None, None], False, "padded_attention"),
            ("per-head mask", per_head, False, "allowed_from_mask"),
            ("additive bias", bias, False, "allowed_from_mask"),
            ("is_causal with a mask", _causal()[None, None], True, "allowed_from_mask"),
            ("bidirectional (no mask, not causal)", None, False, "allowed_from_mask"),
            ("packed documents", documents[None, None], False, "padded_attention"),
            ("a later key", future[None, None], False, "padded_attention"),
            ("an integer mask", _causal().long()[None, None], False, "allowed_from_mask")]


REFUSED = _refused()


@pytest.mark.parametrize("name,mask,is_causal,where", REFUSED, ids=[r[0] for r in REFUSED])
def test_masks_other_than_causal_padding_are_refused(seed, name, mask, is_causal, where):
    q, k, v = randn(B_, H_, S_, D_), randn(B_, H_, S_, D_), randn(B_, H_, S_, D_)
    allowed, why = allowed_from_mask(mask, is_causal, B_, S_, S_)
    if where == "allowed_from_mask":
        assert allowed is None and isinstance(why, str) and why
    else:
        assert why is None and allowed is not None
        assert padded_attention(q, k, v, allowed, D_ ** -0.5) is None


@pytest.mark.parametrize("name,mask,is_causal,where", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_masks_fall_back_inside_the_mode(seed, name, mask, is_causal, where):
    """Strict: NotInvariantError. Otherwise a warning, then PyTorch's result, or PyTorch's own error where
    PyTorch takes no such call (is_causal with a mask, an integer mask)."""
    q, k, v = randn(B_, H_, S_, D_), randn(B_, H_, S_, D_), randn(B_, H_, S_, D_)
    kwargs = dict(attn_mask=mask, is_causal=is_causal)
    with detmoe.invariant_mode(strict=True), pytest.raises(detmoe.NotInvariantError,
                                                           match="scaled_dot_product_attention"):
        F.scaled_dot_product_attention(q, k, v, **kwargs)
    try:
        want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    except RuntimeError as e:
        want = e
    fallback.forget_warnings()
    with warnings.catch_warnings(record=True) as caught, detmoe.invariant_mode():
        warnings.simplefilter("always")
        if isinstance(want, Exception):
            with pytest.raises(type(want)):
                F.scaled_dot_product_attention(q, k, v, **kwargs)
        else:
            got = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert [w for w in caught if issubclass(w.category, detmoe.InvariantModeWarning)
            and "scaled_dot_product_attention" in str(w.message)]
    if not isinstance(want, Exception):
        assert_same_bits(got, want, "the fallback against PyTorch outside the mode")
