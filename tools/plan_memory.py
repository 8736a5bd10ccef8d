"""Memory planner CLI: `python tools/plan_memory.py --model llama-3-70b --nodes 8 ...`.

The planner lives in `dotmoe_ds/plan.py` (also `dotmoe plan ...`); this wrapper keeps the path the
SLURM scripts and the README use.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dotmoe_ds.plan import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
