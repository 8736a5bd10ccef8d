"""Recovery training of the converted MoE vs fine-tuning the dense model: tokens/s, same data and hardware.

    python tools/bench_recover.py                                  # tiny llama, CPU, one process
    python tools/bench_recover.py --model PATH --num_experts 8 --top_k 2 --seq_len 256 --steps 8
    deepspeed --num_gpus 8 tools/bench_recover.py --device cuda --model PATH --ep_size 8

Both runs are DeepSpeed engines built from the same config (--ds_config, default
ds_configs/z3_ep.json; the dense run drops its "expert_parallel" section) training every weight
with next-token cross-entropy on the same token blocks. The MoE is the dense model converted
with a random capacity-exact partition and exported by dotmoe's exporter (the speed of an MoE
step does not depend on which neurons went where), then loaded as the standard HF MoE and run
through AutoEP with experts over groups of --ep_size ranks, exactly as `--phase recover` does.
The two engines alternate steps (dense, MoE, dense, ...) after --warmup steps each, so drift in
machine load hits both alike; medians, tokens/s over all ranks and the ratio are printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="dense HF folder, or 'tiny' (a random llama, d=256, 4 layers)")
    p.add_argument("--num_experts", type=int, default=8)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--ep_size", type=int, default=0, help="0: the number of ranks")
    p.add_argument("--ds_config", default=str(ROOT / "ds_configs" / "z3_ep.json"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--steps", type=int, default=6, help="timed steps of each")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--local_rank", type=int, default=-1)
    return p.parse_args()


def dense_folder(name: str, work: Path) -> Path:
    if name != "tiny":
        return Path(name)
    from dotmoe_ds.tiny_models import save_tiny_model

    return save_tiny_model("llama", work / "dense", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4)


def export_random_moe(dense: Path, out: Path, num_experts: int, top_k: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from dotmoe_ds.export import export_moe
    from dotmoe_ds.families import adapter_for
    from dotmoe_ds.layer import DotMoEFFN, set_mode
    from dotmoe_ds.partition import random_partition
    from dotmoe_ds.spec import MoESpec

    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    spec = MoESpec.uniform(model.config.intermediate_size, num_experts, top_k)
    adapter = adapter_for(model.config)
    adapter.swap_in(model, lambda i, g, u, d, a: DotMoEFFN(
        g, u, d, a, spec, init_assignment=random_partition(spec, i),
        router_weight=torch.randn(num_experts, model.config.hidden_size) * 0.1))
    set_mode(model, "hard")
    export_moe(model, adapter, spec, out, source_dir=dense, overwrite=True, is_writer=True)
    return out


def engine_for(path: Path, ds: dict):
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from dotmoe_ds.config import zero_stage

    keep = None
    if zero_stage(ds) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    groups = [{"name": "all", "params": list(model.parameters())}]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    return engine, keep


def main() -> int:
    args = parse()
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from dotmoe_ds import distributed as dist
    from dotmoe_ds.autoep_compat import apply_autoep_compat
    from dotmoe_ds.config import load_ds_config
    from dotmoe_ds.evaluate import token_nll
    from dotmoe_ds.recover import expert_parallel_section, resolve_ep_size

    threads = dist.set_threads(args.threads)
    info = dist.init_distributed()
    apply_autoep_compat()
    world = info.world_size
    raw = load_ds_config(args.ds_config)
    raw.update(train_micro_batch_size_per_gpu=args.batch_size, gradient_accumulation_steps=1,
               train_batch_size=args.batch_size * world)
    raw["optimizer"]["params"]["lr"] = 1e-4
    raw["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 1}}
    raw["tensorboard"] = {"enabled": False}
    raw["bf16"] = {"enabled": args.device == "cuda"}
    ep = resolve_ep_size(args.ep_size or world, raw, world, args.num_experts)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dense = moe = None
        if dist.is_main():
            dense = dense_folder(args.model, work)
            moe = export_random_moe(dense, work / "moe", args.num_experts, args.top_k)
        dense, moe = dist.broadcast_object((dense, moe))   # one machine: the folders are shared
        from transformers import AutoConfig

        moe_cfg = AutoConfig.from_pretrained(moe)
        ds_dense = {k: v for k, v in raw.items() if k != "expert_parallel"}
        ds_moe = dict(raw, expert_parallel=expert_parallel_section(moe_cfg, ep, raw.get("expert_parallel")))
        torch.manual_seed(0)
        engines = {"dense fine-tuning": engine_for(dense, ds_dense), f"MoE recovery (AutoEP, ep={ep})": engine_for(moe, ds_moe)}
        gen = torch.Generator().manual_seed(1000 + dist.rank())
        vocab = moe_cfg.vocab_size
        batches = [torch.randint(3, vocab, (args.batch_size, args.seq_len), generator=gen)
                   for _ in range(args.warmup + args.steps)]
        times: dict[str, list[float]] = {name: [] for name in engines}
        for i, ids in enumerate(batches):
            for name, (engine, _) in engines.items():
                ids_d = ids.to(engine.device)
                dist.barrier()
                start = time.perf_counter()
                loss = token_nll(engine(input_ids=ids_d).logits, ids_d).mean()
                engine.backward(loss)
                engine.step()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                dist.barrier()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    if dist.is_main():
        tokens = args.batch_size * args.seq_len * world
        c = moe_cfg
        print(f"model {args.model}: d={c.hidden_size}, {c.num_hidden_layers} layers; MoE E={args.num_experts} "
              f"k={args.top_k} (expert size {c.intermediate_size}); {world} rank(s) x {threads} thread(s), "
              f"{args.device}; batch {args.batch_size} x {args.seq_len} per rank; {args.ds_config}; "
              f"median of {args.steps} alternating steps after {args.warmup} warm-up")
        rates = {}
        for name, ts in times.items():
            med = statistics.median(ts)
            rates[name] = tokens / med
            print(f"  {name:<32} step {med * 1000:9.1f} ms   {rates[name]:10.1f} tokens/s")
        d, m = rates.values()
        print(f"ratio MoE recovery / dense fine-tuning tokens/s: {m / d:.3f}")
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
