import os

import pytest
import torch

# Two cores: more threads than that only adds contention; multi-process tests set their own.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
