"""What an export records about where it came from, without private paths of the machine.

`portable_command` is the command line with the interpreter written as `python` and every absolute
path argument made relative to the working directory (`--model /home/me/runs/x` run from
/home/me becomes `--model runs/x`); `public_model_name` is the name a model card gives the source
model: the hub id for a packaged model (demo, qwen-coder), what the user passed for a hub id, a relative path for a
local folder. Neither ever returns an absolute path.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from dotmoe_ds.demo import packaged_hub_id


def _relative(arg: str) -> str:
    if arg.startswith("--") and "=" in arg:
        flag, value = arg.split("=", 1)
        return f"{flag}={_relative(value)}"
    if os.path.isabs(arg):
        return os.path.relpath(arg)
    return arg


def portable_command(argv: Sequence[str] | None = None) -> str:
    """This process's command line (or `argv`, argv[0] first) without absolute paths."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return "python"
    program = argv[0]
    if Path(program).name == "dotmoe":              # the console script
        head = ["dotmoe"]
    elif program in ("-c", "-m") or not program:
        head = ["python", program]
    else:
        head = ["python", _relative(program)]
    return shlex.join([*head, *(_relative(a) for a in argv[1:])])


def is_hub_id(name: str) -> bool:
    """`owner/name` or `name` that is not a path on this machine."""
    return (bool(name) and not os.path.isabs(name) and not name.startswith((".", "~"))
            and name.count("/") <= 1 and not Path(name).exists())


def public_model_name(source: str | os.PathLike | None) -> str | None:
    """The hub id for a packaged model's folder; a hub id as given; else the path relative to the working
    directory. None for None."""
    if source is None:
        return None
    source = str(source)
    if Path(source).is_dir():
        hub = packaged_hub_id(source)
        if hub is not None:
            return hub
    return _relative(source)
