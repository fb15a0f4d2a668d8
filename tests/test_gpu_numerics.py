"""GPU: 200 Adam steps of Mamba4Rec under bf16 autocast at length 2,048 stay finite.

Loss, every gradient and every parameter are checked at every step, with both backends: mamba-ssm's
fused kernels (skipped where they do not import) and the pure-PyTorch scan on the GPU. Skipped
without CUDA. The same loop runs briefly on the CPU in tests/test_numerics.py.
"""

import pytest
import torch

from recbole_mamba.nn.mamba_mixer import resolve_backend
from tests.test_numerics import train_with_bf16_autocast

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_bf16_autocast_training_at_length_2048_stays_finite(backend):
    if backend == "cuda":
        chosen, description = resolve_backend("auto", "cuda")
        if chosen != "cuda":
            pytest.skip(f"mamba-ssm kernels unavailable: {description}")
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    losses = train_with_bf16_autocast("cuda", backend, length=2048, steps=200, batch_size=4)
    assert len(losses) == 200
