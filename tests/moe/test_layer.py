"""MoELayer against a plain loop over tokens and experts in float64."""
import pytest
import torch
import torch.nn.functional as F

from detmoe import moe


def reference_moe(layer: moe.MoELayer, x: torch.Tensor, routing: moe.Routing) -> torch.Tensor:
    """Token by token, kept assignment by assignment: sum_j w_j * expert_{e_j}(x)."""
    cfg = layer.cfg
    Fd = cfg.d_expert
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(routing.experts.shape[1]):
            if routing.dropped[t, j]:
                continue
            e = int(routing.experts[t, j])
            gu = x[t] @ layer.w_gate_up[e]
            y[t] += routing.weights[t, j] * ((F.silu(gu[:Fd]) * gu[Fd:]) @ layer.w_down[e])
    if cfg.n_shared_experts:
        gu = x @ layer.w_shared_gate_up
        Fs = gu.shape[1] // 2
        s = (F.silu(gu[:, :Fs]) * gu[:, Fs:]) @ layer.w_shared_down
        if cfg.shared_expert_gate:
            s = s * torch.sigmoid(x @ layer.w_shared_gate)
        y += s
    return y


def reference_topk(x, layer, top_k):
    probs = torch.softmax(x @ layer.w_router, -1)
    w, e = torch.topk(probs, top_k, dim=-1)
    return e, w / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("router", moe.ROUTERS)
@pytest.mark.parametrize("combine", moe.COMBINES)
@pytest.mark.parametrize("shared", [0, 2])
def test_layer_matches_float64_loop(seed, router, combine, shared):
    cfg = moe.MoEConfig(n_experts=6, top_k=2, d_expert=12, router=router, combine=combine,
                        n_shared_experts=shared, shared_expert_gate=bool(shared), capacity_factor=0.8,
                        group_size=5)
    layer = moe.MoELayer(cfg, d_model=16).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    T = 23
    x = torch.randn(T, 16, dtype=torch.float64)
    seq_ids = torch.tensor([0] * 9 + [1] * 14)
    y, routing = layer(x, seq_ids)
    assert y.dtype == torch.float64 and y.shape == (T, 16)
    torch.testing.assert_close(y, reference_moe(layer, x, routing), rtol=1e-10, atol=1e-12)
    if router == "topk":
        e, w = reference_topk(x, layer, 2)
        assert torch.equal(routing.experts, e)
        torch.testing.assert_close(routing.weights, w.float())
    if router in ("capacity", "sequence_capacity"):
        assert routing.dropped.any(), "capacity 0.8 should drop something in this case"


def test_layer_rejects_bad_shapes():
    layer = moe.MoELayer(moe.MoEConfig(n_experts=4, top_k=1, d_expert=8), d_model=16)
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.randn(3, 15), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="seq_ids"):
        layer(torch.randn(3, 16), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one token"):
        layer(torch.randn(0, 16), torch.zeros(0, dtype=torch.long))
