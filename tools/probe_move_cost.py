"""Does the assignment's straight-through gradient pick neuron moves that help? An untrained probe on
calibration text only (never the held-out books).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/probe_move_cost.py 5,10,15,25

For each named layer of SmolLM2-135M: the trainer's start for the study's 50% budget (512 shared +
16 x 64, k 4: co-activation partition, least-squares router, beta 1, tau 1), fitted on 2,048 Emma tokens.
The layer's relative reconstruction error (objectives.relative_reconstruction_error) is backpropagated
on the first 1,024 of them (the scores' gradient through Sinkhorn and the STE, as in training); each
single move of a routed neuron to another routed expert is then ranked (a) by the gain the score
gradient gives it (what `score_optim.bounded_step` takes first: g[n, old] - g[n, new]) and (b) by its
exact change of the error, which for one neuron n moving from expert a to e is, summed over tokens x with
weight w(x) = 1 / (T ||y_dense(x)||^2), residual r(x) = y_moe(x) - y_dense(x), activation h_n(x), gates G,
and c_n = W_d[:, n]:
    2 (G_e - G_a) h_n (r . c_n) + (G_e - G_a)^2 h_n^2 ||c_n||^2
(the first term is the plain first-order one; the second, always >= 0, is what a first-order rank leaves
out). "harmful" = the exact change is > 0, on the same 1,024 tokens and on 1,024 Mansfield Park tokens
(the next batch, which chose nothing). Checks the formula against recomputing the layer. ~1 min a layer.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from dotmoe_ds import partition as P  # noqa: E402
from dotmoe_ds.demo import resolve_model  # noqa: E402
from dotmoe_ds.layer import DotMoEFFN  # noqa: E402
from dotmoe_ds.objectives import RECON_FLOOR, relative_reconstruction_error  # noqa: E402
from dotmoe_ds.spec import MoESpec  # noqa: E402

AUSTEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen"


@torch.no_grad()
def layer_terms(layer: DotMoEFFN, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(activations h [T, d_ff], gates per column G [T, E'] (the shared column 1), dense output [T, d])."""
    h = layer.act_fn(layer.gate_proj(x)) * layer.up_proj(x)
    gates = layer.gates(x)
    G = torch.cat([gates, torch.ones_like(gates[:, :1])], 1) if layer.spec.has_shared else gates
    return h, G, layer.down_proj(h)


def move_costs(layer: DotMoEFFN, x: torch.Tensor, assign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact, first-order) change of the layer's relative reconstruction error on tokens `x` for every
    single move: [d_ff, E'] (0 in the neuron's own column)."""
    with torch.no_grad():
        h, G, dense = layer_terms(layer, x)
        wd = layer.down_proj.weight
        r = layer.down_proj(h * G[:, assign]) - dense
        den = dense.pow(2).sum(-1)
        den = torch.maximum(den, RECON_FLOOR * den.mean())
        w = 1.0 / den / x.shape[0]
        p = w[:, None] * h * (r @ wd)
        q = w[:, None] * h.pow(2) * wd.pow(2).sum(0)
        ga = G[:, assign]
        first = 2 * (G.T @ p).T - 2 * (ga * p).sum(0)[:, None]
        second = (G.pow(2).T @ q).T - 2 * (G.T @ (ga * q)).T + (ga.pow(2) * q).sum(0)[:, None]
        return first + second, first


def probe_layer(model, idx: int, cal_ids, next_ids) -> list[str]:
    mlp = model.model.layers[idx].mlp
    seen = {}
    hook = mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(cal_ids)
        xc = seen["x"]
        model(next_ids)
        xn = seen["x"]
    hook.remove()
    wd = mlp.down_proj.weight.detach()
    hc = (mlp.act_fn(mlp.gate_proj(xc)) * mlp.up_proj(xc)).detach()
    spec = MoESpec.uniform(mlp.down_proj.in_features, 16, 4, shared=512)
    part = P.coactivation_partition(hc, spec, seed=0, down_weight=wd)
    router = P.fit_router_lstsq(xc, P.expert_output_norms(hc, wd, part, spec))
    layer = DotMoEFFN(mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn, spec, init_assignment=part,
                      router_weight=router, beta=1.0, tau=1.0, mode="ste").train()
    for p in layer.parameters():
        p.requires_grad_(False)
    layer.recon, layer.learn_scores = True, True
    xb = xc[:1024]
    layer(xb)
    base = float(layer.last_recon.detach())
    layer.last_recon.backward()
    g = layer.score_grad
    assign = layer.hard_assignment().clone()
    exact, first = move_costs(layer, xb, assign)
    exact_next, _ = move_costs(layer, xn, assign)
    # the formula against recomputing the layer with one neuron moved
    n = int(torch.nonzero(assign < 16)[0])
    moved = assign.clone()
    moved[n] = (assign[n] + 1) % 16
    with torch.no_grad():
        h, G, dense = layer_terms(layer, xb)
        redo = float(relative_reconstruction_error(layer.down_proj(h * G[:, moved]), dense)
                     - relative_reconstruction_error(layer.down_proj(h * G[:, assign]), dense))
    assert abs(redo - float(exact[n, moved[n]])) <= 1e-3 * abs(redo) + 1e-9, (redo, float(exact[n, moved[n]]))
    routed = (assign < 16)[:, None] & torch.ones_like(exact, dtype=torch.bool)
    routed[:, 16] = False
    routed[torch.arange(len(assign)), assign] = False
    ste_gain = (g.gather(1, assign[:, None]) - g)[routed]
    rows = []
    for name, rank in (("score gradient (STE)", -ste_gain), ("first-order dL/dA", first[routed]),
                       ("exact, same tokens", exact[routed])):
        for top in (16, 100):
            pick = rank.argsort()[:top]
            same, nxt = exact[routed][pick], exact_next[routed][pick]
            rows.append(f"| {idx} | {name} | {top} | {same.mean():+.2e} | {(same > 0).float().mean():.0%} "
                        f"| {nxt.mean():+.2e} | {(nxt > 0).float().mean():.0%} |")
    print(f"layer {idx}: error {base:.4f}; single moves lowering it on the same tokens: "
          f"{int((exact[routed] < 0).sum())} of {int(routed.sum())}", flush=True)
    return rows


def main(layers="10") -> None:
    """LAYERS: comma-separated layer indices (fire hands them over as a tuple)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    path = resolve_model("demo")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cal = torch.tensor(tok((AUSTEN / "emma.txt").read_text()[:40000])["input_ids"][:2048]).view(8, 256)
    nxt = torch.tensor(tok((AUSTEN / "mansfieldpark.txt").read_text()[100000:140000])["input_ids"][:1024]).view(4, 256)
    rows = []
    for idx in (layers if isinstance(layers, (tuple, list)) else [int(v) for v in str(layers).split(",")]):
        rows += probe_layer(model, idx, cal, nxt)
    print("\n| layer | moves ranked by | top | exact change, same tokens | harmful | exact change, next batch | harmful |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
