import pyro
import pytest
import torch

from pyro_vae.data import load_dataset


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    yield


@pytest.fixture(scope="session")
def small_mnist():
    """2,000 training and 500 test images of binarized MNIST (real data, fetched once)."""
    return load_dataset("binarized-mnist", "cpu", train_size=2000, test_size=500)
