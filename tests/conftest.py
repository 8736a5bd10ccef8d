import os

# Before torch loads OpenMP: waiting threads sleep instead of spinning. With several processes on
# 2 cores (multi-rank tests, subprocess runs), spinning made small matrix products ~100x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores: more threads than that only adds contention; multi-process tests set their own.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
