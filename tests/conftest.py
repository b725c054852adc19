import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# shared/ sits beside the checkout (../shared); FLEXTOK_SHARED overrides it.
SHARED = Path(os.environ.get("FLEXTOK_SHARED", ROOT.parent / "shared"))
GOLDEN = SHARED / "golden" / "flextok_tiny"

# 2 threads like CI; FLEXTOK_TEST_THREADS=1 runs the suite single-threaded (the suite must pass at both: the
# reduction order of a matmul, and so its last bits, depend on the thread count)
torch.set_num_threads(int(os.environ.get("FLEXTOK_TEST_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    if not (GOLDEN / "vectors.safetensors").is_file():
        raise pytest.UsageError(f"golden vectors not found at {GOLDEN}; set FLEXTOK_SHARED to the shared/ folder")


@pytest.fixture
def one_thread_fresh_accelerate():
    """For tests that run the training scripts in-process: each script builds an Accelerator, whose singletons must
    be reset between runs; one intra-op thread, since these models are tiny and OpenMP threads only contend on a
    busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.set_num_threads(threads)
