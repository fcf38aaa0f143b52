"""Test-wide settings."""

import torch

# The tests use tiny tensors, for which thread start-up costs more than it saves; one thread
# also keeps timings sane when several test processes share the machine.
torch.set_num_threads(1)
