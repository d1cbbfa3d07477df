import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles new model instances: start from an empty dynamo cache."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
