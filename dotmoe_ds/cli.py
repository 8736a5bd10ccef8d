"""The `dotmoe` console script: `dotmoe train [flags]` (more subcommands join as they are built).

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

Multi-process: deepspeed --num_gpus N --module dotmoe_ds.train --deepspeed ds_configs/z3.json [flags]"""


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
    print(f"dotmoe: error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
