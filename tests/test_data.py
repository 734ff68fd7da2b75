import gzip
import io
import pickle

import numpy as np
import pytest
import torch

from pyro_vae.checks import DataError, check_finite
from pyro_vae.data import (
    NumpyOnlyUnpickler,
    batch_indices,
    load_dataset,
    read_mnist_pickle,
)


def test_unpickler_admits_numpy_arrays_only():
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(arr))).load(), arr)
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(print))).load()
    with pytest.raises(pickle.UnpicklingError):
        NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(io.StringIO))).load()


def test_mnist_pickle_is_read_as_exact_uint8_60k_10k_layout():
    rng = np.random.default_rng(0)
    u8 = [rng.integers(0, 256, size=(n, 784)).astype(np.uint8) for n in (5, 3, 2)]
    labels = [rng.integers(0, 10, size=len(u)) for u in u8]
    parts = tuple((u.astype(np.float32) / 256, y) for u, y in zip(u8, labels))
    raw = gzip.compress(pickle.dumps(parts, protocol=2))
    a = read_mnist_pickle(raw)
    assert np.array_equal(a["x_train"], np.concatenate(u8[:2]))
    assert np.array_equal(a["x_test"], u8[2])
    assert np.array_equal(a["y_train"], np.concatenate(labels[:2]))


def test_binarized_mnist_split_and_fixed_test_binarization():
    d = load_dataset("binarized-mnist")
    assert d.train.shape == (60000, 784) and d.test.shape == (10000, 784)
    assert d.train_labels.shape == (60000,) and d.num_classes == 10
    assert set(d.test.unique().tolist()) == {0.0, 1.0}
    assert 0.0 <= float(d.train.min()) and float(d.train.max()) == 1.0
    assert 0.12 < float(d.train.mean()) < 0.14  # MNIST's mean grey level is about 0.13
    again = load_dataset("binarized-mnist", test_size=100)
    assert torch.equal(again.test, d.test[:100])  # the test set is binarized once, the same way
    b1 = d.batch(torch.arange(100))
    b2 = d.batch(torch.arange(100))
    assert set(b1.unique().tolist()) <= {0.0, 1.0} and not torch.equal(b1, b2)  # dynamic


def test_validation_holdout():
    d = load_dataset("mnist", train_size=1000, validation=200)
    assert d.train.shape == (800, 784) and d.valid.shape == (200, 784)
    assert d.valid_labels.shape == (200,) and not d.binarize


def test_batch_indices_cover_every_point_once():
    idx = torch.cat(batch_indices(1003, 100, "cpu"))
    assert sorted(idx.tolist()) == list(range(1003))


def test_tensor_files_and_image_folder(tmp_path):
    x = torch.rand(50, 3, 4, 4)
    np.save(tmp_path / "x.npy", x.numpy())
    d = load_dataset(str(tmp_path / "x.npy"))
    assert d.x_dim == 48 and len(d.train) + len(d.test) == 50 and d.image_shape == (3, 4, 4)
    torch.save({"x": x, "y": torch.arange(50) % 2}, tmp_path / "x.pt")
    d = load_dataset(str(tmp_path / "x.pt"))
    assert d.num_classes == 2 and len(d.train_labels) == len(d.train)

    from PIL import Image

    for cls in ("cats", "dogs"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    d = load_dataset(str(tmp_path / "imgs"))
    assert d.image_shape == (3, 8, 8) and d.num_classes == 2 and len(d.train) == 9


def test_bad_data_gets_a_clear_error(tmp_path):
    x = torch.rand(20, 5)
    x[3, 2] = float("nan")
    with pytest.raises(DataError, match=r"NaN or infinite.*row 3.*nan_to_num"):
        check_finite(x, "training data")
    with pytest.raises(DataError, match="empty"):
        check_finite(torch.zeros(0, 5), "training data")
    np.save(tmp_path / "bad.npy", x.numpy())
    with pytest.raises(DataError, match="NaN"):
        load_dataset(str(tmp_path / "bad.npy"))
    with pytest.raises(DataError, match="unknown dataset 'nope'.*binarized-mnist"):
        load_dataset("nope")
