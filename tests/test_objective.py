"""The layer-local reconstruction term (objectives.py, DotMoEFFN.recon, train.AuxLosses): zero when
every expert is active, equal to an independent computation on a tiny model, and its gradient
reaches the scores and the router (through the layer output, as under ZeRO-3)."""
import pytest
import torch
import torch.nn.functional as F

from dotmoe_ds import train
from dotmoe_ds.families import adapter_for
from dotmoe_ds.layer import DotMoEFFN, set_mode
from dotmoe_ds.objectives import relative_reconstruction_error
from dotmoe_ds.spec import MoESpec
from dotmoe_ds.tiny_models import tiny_model


def _random_partition(spec, seed):
    cols = torch.cat([torch.full((c,), i) for i, c in enumerate(spec.column_capacities)])
    return cols[torch.randperm(spec.d_ff, generator=torch.Generator().manual_seed(seed))]


def _converted(spec_of, router_scale=1.0, seed=0):
    """The tiny llama with every MLP a DotMoEFFN (random partition, random router unless 0)."""
    model = tiny_model("llama", seed=seed).float()
    gen = torch.Generator().manual_seed(seed + 1)

    def make(i, gate, up, down, act):
        spec = spec_of(gate.out_features)
        router = router_scale * torch.randn(spec.num_experts, gate.in_features, generator=gen)
        return DotMoEFFN(gate, up, down, act, spec, init_assignment=_random_partition(spec, seed + i),
                         router_weight=router, beta=2.0, tau=0.5, mode="ste")

    layers = adapter_for(model.config).swap_in(model, make)
    return model.train(), layers


def test_relative_error_by_hand():
    t = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([[3.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    # token ratios 16/25, 1/1, 0/4
    assert relative_reconstruction_error(y, t).item() == pytest.approx((16 / 25 + 1 + 0) / 3)
    # a zero target is floored at 1e-6 of the mean ||t||^2, not divided by zero
    t0 = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    y0 = torch.tensor([[1e-3, 0.0], [1.0, 0.0]])
    assert relative_reconstruction_error(y0, t0).item() == pytest.approx((1e-6 / (1e-6 * 0.5)) / 2)
    with pytest.raises(ValueError, match="shape"):
        relative_reconstruction_error(y, t[:2])


def test_zero_when_every_expert_is_active():
    """k = E with a zero router (every gate 1): the MoE is the dense FFN, the term is 0."""
    model, layers = _converted(lambda d_ff: MoESpec.uniform(d_ff, 4, top_k=4), router_scale=0.0)
    aux = train.AuxLosses(layers, lb_weight=0.0, z_weight=0.0, grad_accum=1, recon_weight=1.0)
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids)
    assert aux.recon_count == len(layers)
    assert aux.take_recon() < 1e-10
    # and it is clearly not 0 at k < E
    model, layers = _converted(lambda d_ff: MoESpec.uniform(d_ff, 4, top_k=2), router_scale=0.0)
    aux = train.AuxLosses(layers, lb_weight=0.0, z_weight=0.0, grad_accum=1, recon_weight=1.0)
    model(input_ids=ids)
    assert aux.take_recon() > 0.05


@torch.no_grad()
def _independent_recon(x, layer: DotMoEFFN):
    """The materialised MoE (softmax, top-k, renormalised, k folded into down) against the dense
    FFN on the same input, from the weights alone."""
    w = layer.materialise()
    Wg, Wu, Wd = layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight
    xf = x.reshape(-1, x.shape[-1]).double()
    dense = (F.silu(xf @ Wg.double().T) * (xf @ Wu.double().T)) @ Wd.double().T
    probs = torch.softmax(xf @ w.router.double().T, dim=-1)
    top_p, top_i = probs.topk(w.spec.top_k, dim=-1)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    moe = torch.zeros_like(dense)
    for e in range(w.spec.num_experts):
        out = (F.silu(xf @ w.gate[e].double().T) * (xf @ w.up[e].double().T)) @ w.down[e].double().T
        moe += (top_p * (top_i == e)).sum(-1, keepdim=True) * out
    return float((((moe - dense) ** 2).sum(-1) / (dense ** 2).sum(-1)).mean())


def test_equals_an_independent_computation_on_a_tiny_model():
    model, layers = _converted(lambda d_ff: MoESpec.uniform(d_ff, 4, top_k=2), router_scale=0.5, seed=3)
    inputs = {}
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].detach().clone()))
    aux = train.AuxLosses(layers, lb_weight=0.01, z_weight=0.0, grad_accum=1, recon_weight=0.7)
    ids = torch.randint(3, 512, (3, 10), generator=torch.Generator().manual_seed(1))
    logits = model(input_ids=ids).logits
    got = aux.take_recon()
    want = sum(_independent_recon(inputs[i], layer) for i, layer in enumerate(layers)) / len(layers)
    assert want > 0.05
    assert got == pytest.approx(want, rel=1e-5)
    # the trainer's logged total counts it with its weight (train_loop: + recon_weight * recon)
    logits.sum().backward()   # and the backward through the attached term runs


def _layer(seed=0):
    torch.manual_seed(seed)
    d, d_ff, spec = 16, 24, MoESpec.uniform(24, 4, 2)
    lin = lambda i, o: torch.nn.Linear(i, o, bias=False)   # noqa: E731
    layer = DotMoEFFN(lin(d, d_ff), lin(d, d_ff), lin(d_ff, d), F.silu, spec, init_assignment=torch.arange(d_ff) % 4,
                      router_weight=torch.randn(4, d), beta=1.0, mode="ste")
    return layer.train()


def test_gradient_reaches_scores_and_router_through_the_layer_output():
    """recon_weight * recon / (layers * grad_accum) attached to the output gives the scores (collected
    by learn_scores) and the router exactly the gradient of adding it to the loss directly."""
    x = torch.randn(3, 5, 16)
    direct = _layer()
    direct.recon = True
    y = direct(x)
    ((y.square().mean()) + 0.5 * direct.last_recon / 2).backward()

    hooked = _layer()
    hooked.learn_scores = True
    hooked.scores.requires_grad_(False)
    aux = train.AuxLosses([hooked], lb_weight=0.0, z_weight=0.0, grad_accum=2, recon_weight=0.5)
    hooked(x).square().mean().backward()
    assert hooked.score_grad is not None and hooked.score_grad.abs().max() > 1e-4
    assert direct.router.weight.grad.abs().max() > 1e-4
    torch.testing.assert_close(hooked.score_grad, direct.scores.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(hooked.router.weight.grad, direct.router.weight.grad, atol=1e-6, rtol=1e-5)
    # the recon part alone has a gradient on both (not only the main loss)
    only = _layer()
    only.recon = True
    only(x)
    only.last_recon.backward()
    assert only.scores.grad.abs().max() > 1e-5 and only.router.weight.grad.abs().max() > 1e-5
    # dense mode and no-grad forwards compute nothing
    set_mode(hooked, "dense")
    hooked(x)
    with torch.no_grad():
        set_mode(hooked, "ste")
        hooked(x)
    assert aux.recon_count == 1 and hooked.last_recon is None
    assert aux.take_recon() > 0
    aux.remove()


def test_pruned_layers_get_the_same_term():
    """--method prune trains under the same objective: each pruned layer's term equals the relative
    error of its masked output against its dense output (independent computation), it is 0 when
    every neuron is kept, and its gradient reaches the kept weights only."""
    from dotmoe_ds.baselines import PrunedFFN

    model = tiny_model("llama", seed=0).float().train()
    layers = adapter_for(model.config).swap_in(model, PrunedFFN.wrap)
    aux = train.AuxLosses(layers, lb_weight=0.01, z_weight=0.0, grad_accum=1, recon_weight=1.0)
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    inputs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: inputs.append(a[0].detach())) for layer in layers]
    model(input_ids=ids)                                   # every neuron kept: the dense FFN
    assert aux.recon_count == len(layers) and aux.take_recon() < 1e-10
    kept = [torch.randperm(layer.d_ff, generator=torch.Generator().manual_seed(i))[:layer.d_ff // 2]
            for i, layer in enumerate(layers)]
    for layer, k in zip(layers, kept):
        layer.set_kept(k)
    inputs.clear()
    out = model(input_ids=ids)
    expected = []
    for layer, x in zip(layers, inputs):
        with torch.no_grad():
            h = F.silu(layer.gate_proj(x)) * layer.up_proj(x)
            dense = layer.down_proj(h)
            masked = layer.down_proj(h * layer.keep_mask.float())
        expected.append(((masked - dense).pow(2).sum(-1) / dense.pow(2).sum(-1)).mean())
    assert aux.take_recon() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    for h in hooks:
        h.remove()
    # The term alone (zero logits loss) moves the kept neurons' weights, never the dropped ones'.
    model.zero_grad()
    (out.logits * 0).sum().backward()
    g = layers[0].gate_proj.weight.grad
    dropped = ~layers[0].keep_mask
    assert g[layers[0].keep_mask].abs().sum() > 0 and g[dropped].abs().sum() == 0
    assert aux.take() == (0.0, 0.0)                        # no router: no load balance, no z-loss
