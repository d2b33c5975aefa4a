"""Shared fixtures: float64 exactness tolerances and skip rules."""

import pytest
import torch

EXACT = 1e-10  # max abs error for float64 comparisons of exact paths


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):  # not `in item.keywords`: that also matches directory names
            item.add_marker(skip)
