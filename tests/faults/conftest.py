"""Fault injection (issue 19): kill, corrupt, mistype, and check that nothing is lost or silent.

In-process runs use one thread, as torchrun's workers do (see tests/training/test_pretrain_cli.py)."""
import os

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """Every test in this folder is a fault test (``make faults`` = ``pytest -m faults``), marked or not."""
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.path).startswith(here + os.sep):
            item.add_marker(pytest.mark.faults)
