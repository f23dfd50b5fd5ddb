import logging
import warnings

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Two threads, as on CI, and quiet third-party warnings that are not about our code."""
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    yield
