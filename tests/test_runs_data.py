"""The embedded data sets: their splits, and normalisation statistics that do not depend on threads."""

from __future__ import annotations

import pytest
import torch

from fastnas.runs import data


@pytest.mark.parametrize("name, n_train, n_test, size", [("distorted-digits", 500, 1297, 16), ("digits", 1497, 300, 8)])
def test_embedded_splits(name, n_train, n_test, size):
    d = data.load_dataset(name)
    assert d.x_train.shape == (n_train, 1, size, size) and d.x_test.shape == (n_test, 1, size, size)
    assert d.x_train.dtype == torch.uint8 and d.y_train.unique().numel() == d.num_classes == 10


@pytest.mark.parametrize("name", ["distorted-digits", "digits"])
def test_normalisation_is_exact_and_independent_of_the_thread_count(name):
    threads = torch.get_num_threads()
    loaded = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            loaded.append(data.load_dataset(name))
    finally:
        torch.set_num_threads(threads)
    assert loaded[0].mean == loaded[1].mean and loaded[0].std == loaded[1].std  # the same bits
    pixels = loaded[0].x_train.double() / loaded[0].scale
    assert loaded[0].mean[0] == pytest.approx(pixels.mean().item(), rel=1e-12)
    assert loaded[0].std[0] == pytest.approx(pixels.std().item(), rel=1e-12)
