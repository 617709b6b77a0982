"""The devices a test can run on: the CPU always, CUDA where torch sees a GPU (skipped elsewhere, "no CUDA device")."""
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device"
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
# ``@pytest.mark.parametrize("device", DEVICES)``: cpu, and cuda skipped without a GPU
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=needs_cuda)]
