import logging
import os
import time
import uuid
import warnings

import pytest
import torch

from tests.helpers import SESSION_VARIABLE, project_processes

# inherited by every process the tests start, so that leak checks count this session's processes only
os.environ[SESSION_VARIABLE] = uuid.uuid4().hex


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Two threads, as on CI, and quiet third-party warnings that are not about our code."""
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    yield


@pytest.fixture(autouse=True)
def _no_process_left_behind():
    """Every test cleans up the processes it starts: any project process (train.py, a worker, a DDP rank)
    or child of pytest that appeared during the test must be gone shortly after it ends."""
    before = project_processes()
    yield
    deadline = time.monotonic() + 10  # a process that was told to exit gets a moment to do so
    while (left := project_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes left running after the test: {sorted(left)}"
