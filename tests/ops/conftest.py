import pytest
import torch


@pytest.fixture
def restore_threads():
    """Tests that change torch's thread count get it back afterwards."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# (tolerance for fp32, tolerance for bf16) as assert_close keyword sets
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}
