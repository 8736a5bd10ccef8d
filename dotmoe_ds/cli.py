"""The `dotmoe` console script: `dotmoe train|plan|eval [flags]`.

Multi-process runs go through a launcher, which starts the training module itself:
    deepspeed --num_gpus N dotmoe_ds/train.py --deepspeed ds_configs/z3.json [flags]
    deepspeed --num_gpus N --module dotmoe_ds.train [flags]      (an installed package)
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, fields

USAGE = """usage: dotmoe <command> [flags]

commands:
  train     convert a dense model into a DOT-MoE mixture of experts (dotmoe train --help for flags)
  plan      per-GPU memory plan of a conversion (dotmoe plan --help for flags)
  eval      zero-shot benchmarks, perplexity and cloze accuracy of a model folder (dotmoe eval --help)

Multi-process: deepspeed --num_gpus N --module dotmoe_ds.train --deepspeed ds_configs/z3.json [flags]"""


@dataclass
class EvalCommand:
    """The options of `dotmoe eval`, filled from the command line by fire (as `dotmoe train`'s)."""

    model: str = ""
    """local model folder (a run's OUTPUT/model: dense, pruned or an exported MoE), or 'demo'; also positional"""
    tasks: str = ""
    """zero-shot benchmarks, comma-separated, or 'all': arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,lambada
    (data fetched into $DOTMOE_CACHE on first use)"""
    limit: int = 0
    """the first N items of each benchmark task (0: every item)"""
    scorer: str = "fast"
    """fast: our shared-context scorer inside lm-eval (same numbers); lm_eval: lm-eval's own HFLM"""
    lm_eval_batch_size: int = 1
    """batch size of lm-eval's HFLM (--scorer lm_eval)"""
    dense_results: str = ""
    """--output json of the dense model's `dotmoe eval` with the same --tasks: adds the retention"""
    data: str = ""
    """held-out text files, folders or globs, comma-separated (default: the demo's held-out excerpt)"""
    cloze_items: int = 500
    """cloze items built from the held-out text (0: skip the cloze task)"""
    cloze_seed: int = 0
    """seed of the cloze construction"""
    cloze_method: str = "kv"
    """kv: the context runs once and its cache serves the 4 choices; full: recompute"""
    ppl_blocks: int = 0
    """held-out blocks for perplexity (0: all of them, -1: skip perplexity)"""
    seq_len: int = 512
    """perplexity block length in tokens"""
    domains: str = ""
    """held-out perplexity per domain: NAME=FILES[;NAME=FILES...] (FILES comma-separated, as --data), or 'mix':
    the held-out parts of the calibration mix (King James Bible, Linux docs; fetched into $DOTMOE_CACHE on first
    use) plus Austen's held-out novels from --austen_dir. Without --data, only the domains are scored for
    perplexity (not the default excerpt)"""
    austen_dir: str = ""
    """with --domains mix: the folder of the six Austen novels, whose two held-out ones form the austen domain"""
    batch_size: int = 4
    """perplexity blocks per forward"""
    lm_eval_tasks: str = ""
    """other lm-eval-harness task names, comma-separated (with --lm_eval_include for local ones)"""
    lm_eval_include: str = ""
    """folders of extra lm-eval task YAMLs, comma-separated"""
    lm_eval_limit: int = 0
    """at most this many documents per --lm_eval_tasks task (0: all)"""
    output: str = ""
    """json file for the results (default: print only)"""
    progress: bool = False
    """show a progress bar while scoring the cloze items"""
    device: str = "auto"
    """where the model runs: auto (cuda when a GPU is visible, else cpu), cpu or cuda"""


def eval_help() -> str:
    from dotmoe_ds.config import field_docs

    docs = {name: " ".join(doc.split()) for name, doc in field_docs(EvalCommand).items()}
    lines = ["usage: dotmoe eval MODEL_DIR [--flag value ...]", "",
             "Evaluate a causal LM folder (dense, pruned or an exported MoE): held-out perplexity, the cloze task",
             "built from held-out text, the zero-shot benchmarks through lm-eval-harness (--tasks); prints a table",
             "and writes json with the model's active/total parameter counts.", ""]
    for f in fields(EvalCommand):
        lines.append(f"  --{f.name} (default: {f.default!r})")
        lines.append(f"      {docs.get(f.name, '')}")
    return "\n".join(lines)


def parse_eval_args(argv: list[str]) -> EvalCommand | None:
    """EvalCommand from a command line (None when --help was printed); EvalError for bad flags."""
    import typing

    from dotmoe_ds.config import ConfigError, split_command_line
    from dotmoe_ds.evaluate import EvalError

    if any(a in ("-h", "--help") for a in argv):
        print(eval_help())
        return None
    try:
        args, flags = split_command_line(argv)
    except ConfigError as err:
        raise EvalError(str(err)) from None
    cmd = EvalCommand()
    if len(args) > 1 or (args and "model" in flags):
        raise EvalError(f"one model folder expected, got {' '.join(map(str, args))}: every other option is a flag "
                        "(dotmoe eval --help), and lists are comma-separated (--data a.txt,b.txt)")
    if args:
        flags = {"model": args[0], **flags}
    types = typing.get_type_hints(EvalCommand)
    names = [f.name for f in fields(EvalCommand)]
    for raw, value in flags.items():
        name = raw.replace("-", "_")
        if name not in names:
            import difflib

            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean --{close[0]}?" if close else ""
            raise EvalError(f"unknown flag --{raw}{hint} (dotmoe eval --help lists the flags)")
        kind = types[name]
        if kind is bool:
            if not isinstance(value, bool) and str(value).lower() not in ("true", "false", "1", "0"):
                raise EvalError(f"--{name} is a switch: pass --{name} or --{name}=false, got {value!r}")
            value = value if isinstance(value, bool) else str(value).lower() in ("true", "1")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit():
                raise EvalError(f"--{name} must be an integer, got {value!r}")
            value = int(value)
        else:
            if isinstance(value, bool):
                raise EvalError(f"--{name} needs a value, e.g. --{name} VALUE")
            value = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        setattr(cmd, name, value)
    if not cmd.model:
        raise EvalError("no model given: dotmoe eval MODEL_DIR [flags] (a local model folder, or 'demo')")
    if cmd.cloze_items < 0:
        raise EvalError(f"--cloze_items must be >= 0, got {cmd.cloze_items}")
    if cmd.ppl_blocks < -1:
        raise EvalError(f"--ppl_blocks must be >= -1 (-1 skips perplexity), got {cmd.ppl_blocks}")
    if cmd.device not in ("auto", "cpu", "cuda"):
        raise EvalError(f"--device must be auto, cpu or cuda, got {cmd.device!r}")
    if cmd.cloze_method not in ("kv", "full"):
        raise EvalError(f"--cloze_method must be kv or full, got {cmd.cloze_method!r}")
    if cmd.austen_dir and not cmd.domains:
        raise EvalError("--austen_dir gives the Austen domain of --domains mix; pass --domains mix too")
    if cmd.limit < 0 or cmd.lm_eval_limit < 0:
        raise EvalError("--limit and --lm_eval_limit must be >= 0 (0: every item)")
    return cmd


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


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
    from dotmoe_ds.evaluate import EvalError, EvalSettings, evaluate_model, format_table, parse_domains

    try:
        cmd = parse_eval_args(list(argv))
        if cmd is None:
            return 0
        output = Path(cmd.output) if cmd.output else None
        if output is not None and not output.parent.is_dir():
            raise EvalError(f"the folder of --output {output} does not exist; create it or pick another path")
        settings = EvalSettings(data=_split(cmd.data) or None, cloze_items=cmd.cloze_items, cloze_seed=cmd.cloze_seed,
                                cloze_method=cmd.cloze_method, ppl_blocks=cmd.ppl_blocks, seq_len=cmd.seq_len,
                                batch_size=cmd.batch_size, lm_eval_tasks=_split(cmd.lm_eval_tasks),
                                lm_eval_include=_split(cmd.lm_eval_include) or None,
                                lm_eval_limit=cmd.lm_eval_limit or None, progress=cmd.progress,
                                tasks=_split(cmd.tasks), limit=cmd.limit or None, scorer=cmd.scorer,
                                lm_eval_batch_size=cmd.lm_eval_batch_size, dense_results=cmd.dense_results or None,
                                device=_eval_device(cmd.device),
                                domains=parse_domains(cmd.domains, cmd.austen_dir) if cmd.domains else None)
        result = evaluate_model(cmd.model, settings)
    except (EvalError, DataError, DemoModelError) as err:
        print(f"dotmoe eval: error: {err}", file=sys.stderr)
        return 2
    result["command"] = asdict(cmd)
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
    from dotmoe_ds.distributed import exit_process

    exit_process(main())
