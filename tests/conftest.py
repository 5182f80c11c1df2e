"""Shared fixtures: real data (scikit-learn digits), small and fast."""

from __future__ import annotations

import os

import pytest
import torch

# Two pytest workers on two cores would oversubscribe; tests run single-threaded torch ops
# unless a test sets threads itself.
torch.set_num_threads(int(os.environ.get("EDGEKD_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def digits16():
    from edgekd.data import digits_bundle

    return digits_bundle(image_size=16)


@pytest.fixture(scope="session")
def digits8():
    from edgekd.data import digits_bundle

    return digits_bundle(image_size=8)
