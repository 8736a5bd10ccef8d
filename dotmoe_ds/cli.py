"""The `dotmoe` console script: `dotmoe train|plan|eval [flags]`.

Multi-process runs go through a launcher, which starts the training module itself:
    deepspeed --num_gpus N dotmoe_ds/train.py --deepspeed ds_configs/z3.json [flags]
    deepspeed --num_gpus N --module dotmoe_ds.train [flags]      (an installed package)
"""
from __future__ import annotations

import sys

USAGE = """usage: dotmoe <command> [flags]

commands:
  train     convert a dense model into a DOT-MoE mixture of experts (dotmoe train --help for flags)
  plan      per-GPU memory plan of a conversion (dotmoe plan --help for flags)
  eval      held-out perplexity, cloze accuracy and lm-eval tasks of a model folder (dotmoe eval --help)

Multi-process: deepspeed --num_gpus N --module dotmoe_ds.train --deepspeed ds_configs/z3.json [flags]"""


def _eval_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="dotmoe eval",
        description="Evaluate a causal LM folder (dense or an exported MoE) on held-out text: perplexity, the "
                    "cloze task built from that text, and optional lm-eval-harness tasks; prints a table and "
                    "writes json with the model's active/total parameter counts.")
    parser.add_argument("model", metavar="MODEL_DIR", help="local model folder (a run's OUTPUT/model), or 'demo'")
    parser.add_argument("--data", nargs="+", default=None, metavar="FILE",
                        help="held-out text files, folders or globs, space- or comma-separated "
                             "(default: the demo's held-out excerpt)")
    parser.add_argument("--cloze_items", type=int, default=500, help="cloze items (0: skip the cloze task)")
    parser.add_argument("--cloze_seed", type=int, default=0, help="seed of the cloze construction")
    parser.add_argument("--cloze_method", choices=("kv", "full"), default="kv",
                        help="kv: the context runs once and its cache serves the 4 choices; full: recompute")
    parser.add_argument("--ppl_blocks", type=int, default=0,
                        help="held-out blocks for perplexity (0: all of them, -1: skip perplexity)")
    parser.add_argument("--seq_len", type=int, default=512, help="perplexity block length in tokens")
    parser.add_argument("--batch_size", type=int, default=4, help="perplexity blocks per forward")
    parser.add_argument("--lm_eval_tasks", nargs="+", default=[], metavar="TASK", help="lm-eval-harness task names")
    parser.add_argument("--lm_eval_include", nargs="+", default=None, metavar="DIR",
                        help="folders of extra lm-eval task YAMLs (e.g. tasks over local files)")
    parser.add_argument("--lm_eval_limit", type=int, default=None, help="at most this many documents per lm-eval task")
    parser.add_argument("--output", default=None, help="json file for the results (default: print only)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar while scoring the cloze items")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs (auto: cuda when a GPU is visible, else cpu)")
    return parser


def _eval_device(choice: str) -> str:
    if choice != "auto":
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def eval_main(argv: list[str]) -> int:
    """`dotmoe eval`: returns the exit status (2 for a usage error, with the message on stderr)."""
    import json
    from pathlib import Path

    from dotmoe_ds.data import DataError
    from dotmoe_ds.demo import DemoModelError
    from dotmoe_ds.evaluate import EvalError, EvalSettings, evaluate_model, format_table

    parser = _eval_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:      # --help (0) or bad flags (2, message already printed)
        return int(done.code or 0)
    try:
        if args.cloze_items < 0:
            raise EvalError(f"--cloze_items must be >= 0, got {args.cloze_items}")
        if args.ppl_blocks < -1:
            raise EvalError(f"--ppl_blocks must be >= -1 (-1 skips perplexity), got {args.ppl_blocks}")
        output = Path(args.output) if args.output else None
        if output is not None and not output.parent.is_dir():
            raise EvalError(f"the folder of --output {output} does not exist; create it or pick another path")
        # "a.txt,b.txt" as the trainer's flags take it, or separate words; an existing path stays whole.
        data = None if args.data is None else [
            part for entry in args.data for part in ([entry] if Path(entry).exists() else entry.split(",")) if part]
        settings = EvalSettings(data=data, cloze_items=args.cloze_items, cloze_seed=args.cloze_seed,
                                cloze_method=args.cloze_method, ppl_blocks=args.ppl_blocks, seq_len=args.seq_len,
                                batch_size=args.batch_size, lm_eval_tasks=args.lm_eval_tasks,
                                lm_eval_include=args.lm_eval_include, lm_eval_limit=args.lm_eval_limit,
                                progress=args.progress, device=_eval_device(args.device))
        result = evaluate_model(args.model, settings)
    except (EvalError, DataError, DemoModelError) as err:
        print(f"dotmoe eval: error: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    if output is not None:
        output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from dotmoe_ds.train import main as train_main

        return train_main(rest)
    if command == "plan":
        from dotmoe_ds.plan import cli as plan_cli

        return plan_cli(rest)
    if command == "eval":
        return eval_main(rest)
    print(f"dotmoe: error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
