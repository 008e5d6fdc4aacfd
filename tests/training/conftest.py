import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """In-process runs use one thread, as torchrun's workers do: two OpenMP threads on a busy
    2-core machine spin against each other (about 100× slower here). A module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
