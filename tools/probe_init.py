"""Untrained probe of conversion starting points on calibration-side text (never the held-out books).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/probe_init.py 4 prune kmeans importance coact

For top_k (first argument) and each named start: every layer's partition and least-squares router
are fitted on 2,048 Emma tokens, then the perplexity of 4,096 Mansfield Park tokens (8 x 512) is
printed; `prune` keeps the top-k*192 neurons by activation-weighted norm (p=2) instead.
Measured (k=4, 2 CPU cores shared with other work, ~1-2 min per start): dense 36.6, prune 101.51,
kmeans 2028.52, importance 126.7, coact (co-activation partition) 3475.03. This is the measurement behind the trainer's default start
(`--partition importance --router_init lstsq`); a throwaway probe, kept verbatim for reproduction.
"""
import sys, math, time, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import AutoModelForCausalLM, AutoTokenizer
from dotmoe_ds.demo import resolve_model
from dotmoe_ds import partition as P
from dotmoe_ds.layer import DotMoEFFN
from dotmoe_ds.spec import MoESpec
torch.set_num_threads(1); torch.manual_seed(0)
path = resolve_model("demo")
tok = AutoTokenizer.from_pretrained(path); model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
A = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "austen") + "/"
cal = torch.tensor(tok(open(A + "emma.txt").read()[:40000])["input_ids"][:2048]).view(8, 256)
val = torch.tensor(tok(open(A + "mansfieldpark.txt").read()[200000:260000])["input_ids"][:4096]).view(8, 512)
mlps = [l.mlp for l in model.model.layers]
caps = {}
hooks = [m.register_forward_pre_hook(lambda mod, a, i=i: caps.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]))) for i, m in enumerate(mlps)]
with torch.no_grad(): model(cal)
for h in hooks: h.remove()
def ppl():
    with torch.no_grad():
        out = model(val, labels=val)
    return math.exp(out.loss.item())
print("dense", round(ppl(), 2), flush=True)
k = int(sys.argv[1]) if len(sys.argv) > 1 else 4
spec = MoESpec.uniform(1536, 8, k)
def importance_partition(imp):
    order = imp.argsort(descending=True)
    part = torch.empty(1536, dtype=torch.long)
    for e in range(8): part[order[e * 192:(e + 1) * 192]] = e
    return part
for name in sys.argv[2:]:
    t = time.time()
    for i, m in enumerate(mlps):
        x = caps[i]; g, u, d = m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight
        h = m.act_fn(x @ g.T) * (x @ u.T)
        if name == "prune":
            imp = P.activation_importance(h, d, p=2); keep = imp.argsort(descending=True)[: spec.top_k * 192]
            mask = torch.zeros(1536); mask[keep] = 1
            layer = DotMoEFFN(m.gate_proj, m.up_proj, m.down_proj, m.act_fn, MoESpec.uniform(1536, 1, 1), mode="dense")
            class Masked(torch.nn.Module):
                def __init__(s, m, mask): super().__init__(); s.m, s.mask = m, mask
                def forward(s, x): return s.m.down_proj(s.m.act_fn(s.m.gate_proj(x)) * s.m.up_proj(x) * s.mask)
            model.model.layers[i].mlp = Masked(m, mask); continue
        if name == "kmeans": part = P.kmeans_partition(g, u, spec, i, down_weight=d)
        elif name == "coact": part = P.coactivation_partition(h, spec, i, down_weight=d)
        elif name == "importance": part = importance_partition(P.activation_importance(h, d, p=2))
        norms = P.expert_output_norms(h, d, part, spec)
        router = P.fit_router_lstsq(x, norms, logit_std=0.1)
        model.model.layers[i].mlp = DotMoEFFN(m.gate_proj, m.up_proj, m.down_proj, m.act_fn, spec, init_assignment=part, router_weight=router, mode="hard").eval()
    print(name, f"k={k}", round(ppl(), 2), f"{time.time() - t:.0f}s", flush=True)
    for i, m in enumerate(mlps): model.model.layers[i].mlp = m
