"""Test-wide settings."""

import pytest
import torch

# The tests use tiny tensors, for which thread start-up costs more than it saves; one thread
# also keeps timings sane when several test processes share the machine.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped where no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
