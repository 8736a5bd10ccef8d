"""A stand-in trainer for the SLURM launcher's own tests (rendezvous, signals, failures).

Run as TRAIN_ENTRY by slurm/common.sh, one process per task, with the launcher's environment. It
initialises torch.distributed from MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE (env://, gloo), checks
the rendezvous with an all_reduce, then acts out PROBE_MODE:
  ok       write OUTPUT/rank<r>.json (rank, sizes, node, all_reduce result) and exit 0
  steps    PROBE_STEPS steps of PROBE_STEP_S seconds with an all_reduce each; SIGUSR1/SIGTERM set a
           flag, the next step boundary writes OUTPUT/state.json ("checkpoint") and exits 75; a
           rerun continues from state.json; at the end OUTPUT/done.json lists the attempts;
           PROBE_SLOW_EXIT_S delays rank 0's exit after the checkpoint (a slow teardown)
  crash    rank 1 kills itself with SIGKILL after the rendezvous (a node or process dying)
  hang     rank 1 stops taking part; rank 0's next collective times out after PROBE_TIMEOUT_S
The real trainer is what the conversion tests run; this only isolates the launcher's plumbing.
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 75


def main() -> int:
    out = Path(sys.argv[sys.argv.index("--output") + 1]) if "--output" in sys.argv else Path(os.environ["PROBE_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    mode = os.environ.get("PROBE_MODE", "ok")
    timeout = datetime.timedelta(seconds=float(os.environ.get("PROBE_TIMEOUT_S", "60")))
    dist.init_process_group("gloo", init_method="env://", timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    info = dict(rank=rank, world_size=world, env_rank=int(os.environ["RANK"]),
                local_rank=int(os.environ["LOCAL_RANK"]), env_world=int(os.environ["WORLD_SIZE"]),
                master_addr=os.environ["MASTER_ADDR"], node=os.environ.get("SLURMD_NODENAME", socket.gethostname()),
                all_reduce=total.item(), omp=os.environ.get("OMP_NUM_THREADS"), argv=sys.argv[1:])
    print(f"probe rank {rank}/{world} on {info['node']}: all_reduce={total.item()}", flush=True)

    if mode == "crash":
        dist.barrier()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
        return 0
    if mode == "hang":
        if rank == 1:
            time.sleep(600)
        dist.all_reduce(torch.ones(1))     # rank 0 waits here until the timeout
        return 0
    if mode == "steps":
        return _steps(out, rank)
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _steps(out: Path, rank: int) -> int:
    stop = {"signal": None}

    def handler(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    signal.signal(signal.SIGUSR1, handler)
    signal.signal(signal.SIGTERM, handler)
    state_file = out / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"step": 0, "attempts": []}
    state["attempts"].append({"restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")), "start_step": state["step"]})
    n_steps, step_s = int(os.environ.get("PROBE_STEPS", "20")), float(os.environ.get("PROBE_STEP_S", "0.5"))
    (out / f"running{rank}").write_text(str(state["step"]))
    for step in range(state["step"], n_steps):
        time.sleep(step_s)
        flag = torch.tensor([1.0 if stop["signal"] else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)       # every rank stops at the same step
        if flag.item() > 0:
            state["step"] = step
            state["attempts"][-1]["signal"] = stop["signal"]
            if rank == 0:
                tmp = state_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(state))
                tmp.replace(state_file)
            dist.barrier()
            dist.destroy_process_group()
            if rank == 0:   # a slow teardown: the other ranks have exited (and srun -K acts) before
                time.sleep(float(os.environ.get("PROBE_SLOW_EXIT_S", "0")))
            return REQUEUE_EXIT_CODE
    state["step"] = n_steps
    if rank == 0:
        (out / "done.json").write_text(json.dumps(state))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
