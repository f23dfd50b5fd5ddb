"""The benchmarks behind ``experiments/benchmark.py``: one module per benchmark, plus the statistics they share.

Modules that spawned processes import (``server_load``, ``stats``) import nothing heavier than torch and the
parameter server's own modules, so a child process starts in about the time it takes to import torch.
"""
