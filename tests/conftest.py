import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is imported. Without a GPU every Triton kernel runs on the CPU in
# Triton's interpreter, which is how CI checks them. (Importing torch does not import triton.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
