"""DotMoEFFN: dense equivalence, MoE equivalence, gradients through both STEs, bad input."""
import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from dotmoe_ds.layer import DotMoEFFN, set_mode
from dotmoe_ds.spec import MoESpec, SpecError

D, D_FF = 32, 48


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=D_FF))


def partition_for(spec, seed=0):
    """A random capacity-exact column per neuron."""
    cols = torch.cat([torch.full((c,), i) for i, c in enumerate(spec.column_capacities)])
    return cols[torch.randperm(spec.d_ff, generator=torch.Generator().manual_seed(seed))]


def wrap(mlp, spec, **kw):
    return DotMoEFFN(mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn, spec, **kw)


def reference_moe(x, w):
    """The materialised experts run as a standard MoE: softmax, top-k, renormalise (k folded in down)."""
    xf = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(xf @ w.router.T, dim=-1)
    top_p, top_i = probs.topk(w.spec.top_k, dim=-1)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    out = torch.zeros_like(xf)
    for e in range(w.spec.num_experts):
        expert = torch.nn.functional.silu(xf @ w.gate[e].T) * (xf @ w.up[e].T) @ w.down[e].T
        weight = (top_p * (top_i == e)).sum(-1, keepdim=True)
        out += weight * expert
    if w.shared_gate is not None:
        out += torch.nn.functional.silu(xf @ w.shared_gate.T) * (xf @ w.shared_up.T) @ w.shared_down.T
    return out.reshape(x.shape)


@pytest.mark.parametrize("num_experts", [3, 4, 8])
@pytest.mark.parametrize("mode", ["ste", "hard", "soft"])
def test_k_equals_e_zero_router_is_dense(num_experts, mode):
    mlp = make_mlp()
    x = torch.randn(4, 6, D)
    spec = MoESpec.uniform(D_FF, num_experts, top_k=num_experts)
    layer = wrap(mlp, spec, init_assignment=partition_for(spec), mode=mode)
    torch.testing.assert_close(layer(x), mlp(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("spec", [
    MoESpec.uniform(D_FF, 4, top_k=2),
    MoESpec.uniform(D_FF, 6, top_k=1),
    MoESpec.custom(D_FF, [10, 14, 8], top_k=2, shared=16),
    MoESpec.custom(D_FF, [5, 7, 9, 11, 16], top_k=3),
], ids=["uniform-k2", "uniform-k1", "shared-nonuniform", "nonuniform"])
def test_hard_mode_equals_materialised_moe(spec):
    mlp = make_mlp(1)
    x = torch.randn(3, 5, D)
    layer = wrap(mlp, spec, init_assignment=partition_for(spec, 1),
                 router_weight=torch.randn(spec.num_experts, D))
    layer.mode = "hard"
    torch.testing.assert_close(layer(x), reference_moe(x, layer.materialise()), atol=1e-5, rtol=1e-5)
    # STE forward values are exactly the hard ones.
    layer.mode = "ste"
    torch.testing.assert_close(layer(x), wrap_eval(layer, "hard")(x), atol=1e-6, rtol=0)


def wrap_eval(layer, mode):
    layer.mode = mode
    return layer


def test_materialise_takes_dense_rows_and_scales_down_by_k():
    mlp = make_mlp(2)
    spec = MoESpec.custom(D_FF, [12, 12, 12], top_k=2, shared=12)
    assign = partition_for(spec, 2)
    layer = wrap(mlp, spec, init_assignment=assign)
    w = layer.materialise()
    seen = torch.cat(w.expert_neurons + [w.shared_neurons])
    assert sorted(seen.tolist()) == list(range(D_FF))
    for e, idx in enumerate(w.expert_neurons):
        assert (assign[idx] == e).all() and idx.tolist() == sorted(idx.tolist())
        assert torch.equal(w.gate[e], mlp.gate_proj.weight[idx])
        assert torch.equal(w.up[e], mlp.up_proj.weight[idx])
        torch.testing.assert_close(w.down[e], 2 * mlp.down_proj.weight[:, idx], atol=0, rtol=0)
    assert torch.equal(w.shared_down, mlp.down_proj.weight[:, w.shared_neurons])
    # The initial partition is where the assignment starts: rounding its plan gives it back.
    assert torch.equal(layer.hard_assignment(), assign)


def test_gradients_reach_scores_and_router_through_both_stes():
    mlp = make_mlp(3)
    spec = MoESpec.uniform(D_FF, 4, top_k=1)
    x = torch.randn(8, D)
    grads = {}
    for routing_ste in (True, False):
        layer = wrap(mlp, spec, init_assignment=partition_for(spec), router_weight=0.1 * torch.randn(4, D),
                     routing_ste=routing_ste).train()
        layer(x).pow(2).sum().backward()
        assert torch.isfinite(layer.scores.grad).all() and layer.scores.grad.abs().sum() > 0
        grads[routing_ste] = layer.router.weight.grad.clone()
    # With k = 1 the renormalised hard gate is exactly 1: only the routing STE gives the router a gradient.
    assert grads[True].abs().sum() > 0 and torch.isfinite(grads[True]).all()
    assert grads[False].abs().max() < 1e-6 * grads[True].abs().max()   # zero up to float rounding


def test_router_stats_and_softmax_assigner():
    mlp = make_mlp(4)
    spec = MoESpec.uniform(D_FF, 4, top_k=2)
    layer = wrap(mlp, spec, assigner="softmax", init_assignment=partition_for(spec)).train()
    layer(torch.randn(10, D))
    stats = layer.last_router_stats
    torch.testing.assert_close(stats.load.sum(), torch.tensor(1.0))
    assert stats.load_balance.item() >= 1.0 - 1e-5   # E * sum f P >= 1 with a zero router it is exactly 1
    counts = torch.bincount(layer.hard_assignment(), minlength=4).tolist()
    assert counts == list(spec.capacities)


def test_set_mode_applies_to_every_layer():
    mlp = make_mlp()
    spec = MoESpec.uniform(D_FF, 4, top_k=2)
    model = nn.Sequential(wrap(mlp, spec), wrap(make_mlp(1), spec))
    set_mode(model, "hard")
    assert [m.mode for m in model] == ["hard", "hard"]
    with pytest.raises(ValueError, match="mode must be one of"):
        set_mode(model, "bogus")


# ---------------------------------------------------------------------- bad input

def test_budget_errors_name_the_problem():
    with pytest.raises(SpecError, match="add up to d_ff"):
        MoESpec.custom(D_FF, [10, 10], top_k=1)
    with pytest.raises(SpecError, match="top_k=5 must be between 1 and num_experts=4"):
        MoESpec.uniform(D_FF, 4, top_k=5)
    with pytest.raises(SpecError, match="larger than d_ff"):
        MoESpec.custom(3, [1, 1, 1, 1], top_k=1)
    with pytest.raises(SpecError, match="larger than d_ff|at least one"):
        MoESpec.uniform(3, 4, top_k=1)


def test_non_swiglu_mlps_are_refused():
    mlp = make_mlp()
    spec = MoESpec.uniform(D_FF, 4, top_k=2)
    with pytest.raises(TypeError, match="SwiGLU"):
        DotMoEFFN(nn.Conv1d(D, D_FF, 1), mlp.up_proj, mlp.down_proj, mlp.act_fn, spec)
    with pytest.raises(ValueError, match="bias"):
        DotMoEFFN(nn.Linear(D, D_FF), mlp.up_proj, mlp.down_proj, mlp.act_fn, spec)
    with pytest.raises(ValueError, match="not a SwiGLU MLP"):
        DotMoEFFN(mlp.gate_proj, nn.Linear(D, D_FF + 1, bias=False), mlp.down_proj, mlp.act_fn, spec)
    with pytest.raises(ValueError, match="budget is for d_ff=40"):
        wrap(mlp, MoESpec.uniform(40, 4, top_k=2))


def test_bad_assignment_and_non_finite_scores():
    mlp = make_mlp()
    spec = MoESpec.uniform(D_FF, 4, top_k=2)
    with pytest.raises(ValueError, match="expected capacities"):
        wrap(mlp, spec, init_assignment=torch.zeros(D_FF, dtype=torch.long))
    layer = wrap(mlp, spec)
    with torch.no_grad():
        layer.scores[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layer(torch.randn(2, D))


def test_pinned_hard_assignment_is_used_until_unpinned():
    """The trainer rounds each layer on its owner rank and pins the result on every rank: the forward,
    materialise() and the export then use the pin; a bad pin is refused; unpinning rounds again."""
    mlp = make_mlp(5)
    spec = MoESpec.uniform(D_FF, 4, top_k=2)
    own = partition_for(spec, 1)
    layer = wrap(mlp, spec, init_assignment=own, router_weight=0.1 * torch.randn(4, D), mode="hard").eval()
    other = partition_for(spec, 2)
    assert not torch.equal(own, other)
    x = torch.randn(6, D)
    out_own = layer(x)
    layer.pin_hard_assignment(other)
    assert torch.equal(layer.hard_assignment(), other)
    assert [torch.equal(idx, torch.nonzero(other == e).squeeze(1)) for e, idx in
            enumerate(layer.materialise().expert_neurons)] == [True] * 4
    pinned_layer_out = layer(x)
    reference = wrap(mlp, spec, init_assignment=other, router_weight=layer.router.weight.detach(), mode="hard").eval()
    torch.testing.assert_close(pinned_layer_out, reference(x), atol=0, rtol=0)
    assert not torch.allclose(pinned_layer_out, out_own)
    bad = other.clone()
    bad[0] = (bad[0] + 1) % 4            # one expert over capacity, one under
    with pytest.raises(ValueError):
        layer.pin_hard_assignment(bad)
    assert torch.equal(layer.hard_assignment(), other)     # a refused pin leaves the old one
    layer.pin_hard_assignment(None)
    assert torch.equal(layer.hard_assignment(), own)
