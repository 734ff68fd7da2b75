"""dSprites (Matthey et al. 2017), rendered procedurally on the original factor grid, or read from
the original ``.npz``.

The grid: 3 shapes (square, ellipse, heart) x 6 scales (linspace(0.5, 1, 6)) x 40 orientations
(linspace(0, 2 pi, 40): as in the original, the first and last are the same angle) x 32 x 32
positions (linspace(0, 1, 32) each): 737,280 binary 64 x 64 images, in the original's order
(``index = ((((shape * 6 + scale) * 40 + orientation) * 32 + pos_x) * 32 + pos_y``).

How the rendering differs from the original file (which cannot be downloaded here): each pixel is
on when its centre lies inside the shape (no anti-aliasing, no hand-drawn sprite); the centre
moves over [0.2, 0.8] of the image in x (columns) and y (rows); at scale 1 the square has half-side
0.13 (8.3 px), the ellipse semi-axes 0.17 x 0.085, the heart (the curve (x^2 + y^2 - 1)^3 = x^2 y^3)
a half-width of about 0.15 (mean pixel 0.04, as the original's); rotation is about the shape's centre, counter-clockwise on screen.
Sizes, margins and the heart's outline therefore differ by a few pixels from the original, the
factor grid and the symmetries (the square repeats every 90 degrees, the ellipse every 180) do not.
Give the original file's path as the dataset to use it instead (``load_npz``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pyro_vae.errors import DataError
from pyro_vae.files import atomic_write

SHAPES = ("square", "ellipse", "heart")
FACTOR_NAMES = ("shape", "scale", "orientation", "pos_x", "pos_y")
FACTOR_SIZES = (3, 6, 40, 32, 32)
FACTOR_VALUES = (np.arange(1.0, 4.0), np.linspace(0.5, 1.0, 6), np.linspace(0.0, 2 * np.pi, 40),
                 np.linspace(0.0, 1.0, 32), np.linspace(0.0, 1.0, 32))
NUM_IMAGES = int(np.prod(FACTOR_SIZES))  # 737,280
SIZE = 64
CACHE = "dsprites.npz"
NPZ_KEYS = ("imgs", "latents_values", "latents_classes")


def factors_of(index: np.ndarray) -> np.ndarray:
    """Factor classes (n, 5) of grid indices (n,), in the original's order."""
    return np.stack(np.unravel_index(np.asarray(index), FACTOR_SIZES), axis=1).astype(np.int64)


def index_of(factors: np.ndarray) -> np.ndarray:
    """Grid indices (n,) of factor classes (n, 5)."""
    return np.ravel_multi_index(tuple(np.asarray(factors).T), FACTOR_SIZES)


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (u, v) of a shape's own frame (scale 1, unit = image width) are inside it."""
    if shape == 0:
        return (np.abs(u) <= 0.13) & (np.abs(v) <= 0.13)
    if shape == 1:
        return (u / 0.17) ** 2 + (v / 0.085) ** 2 <= 1.0
    x, y = u / 0.13, -v / 0.13 + 0.1  # heart: point up on screen (rows grow downwards)
    return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0


def render(factors: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Binary images (n, 64, 64) uint8 of factor classes (n, 5): a pixel is on when its centre
    lies inside the shape (see the module docstring for the geometry)."""
    factors = np.asarray(factors, dtype=np.int64).reshape(-1, len(FACTOR_SIZES))
    if len(factors) and ((factors < 0).any() or (factors >= np.array(FACTOR_SIZES)).any()):
        raise ValueError(f"factor classes must lie in 0..size-1 for sizes {FACTOR_SIZES}")
    grid = (np.arange(SIZE, dtype=np.float32) + 0.5) / SIZE
    out = np.zeros((len(factors), SIZE, SIZE), dtype=np.uint8)
    for start in range(0, len(factors), chunk):
        f = factors[start : start + chunk]
        scale = FACTOR_VALUES[1][f[:, 1]].astype(np.float32)[:, None, None]
        angle = FACTOR_VALUES[2][f[:, 2]].astype(np.float32)[:, None, None]
        cx = (0.2 + 0.6 * FACTOR_VALUES[3][f[:, 3]]).astype(np.float32)[:, None, None]
        cy = (0.2 + 0.6 * FACTOR_VALUES[4][f[:, 4]]).astype(np.float32)[:, None, None]
        dx, dy = grid[None, None, :] - cx, grid[None, :, None] - cy
        cos, sin = np.cos(angle), np.sin(angle)
        u, v = (cos * dx - sin * dy) / scale, (sin * dx + cos * dy) / scale  # into the shape's frame
        for shape in range(len(SHAPES)):
            rows = f[:, 0] == shape
            if rows.any():
                out[start : start + chunk][rows] = _inside(shape, u[rows], v[rows])
    return out


def grid_images(data_dir: Path, verbose: bool = True) -> np.ndarray:
    """All 737,280 images as packed bits (737280, 512) uint8 (``np.packbits`` of each 64 x 64
    image), from ``data_dir/dsprites.npz``, rendered and cached there on a miss (a few minutes)."""
    if Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir} is a file: give the folder that holds (or will hold) {CACHE}")
    cache = Path(data_dir) / CACHE
    if not cache.exists():
        import sys

        if verbose:
            print(f"rendering dSprites' 737,280 images into {cache} (once; a few minutes) ...", file=sys.stderr)
        cache.parent.mkdir(parents=True, exist_ok=True)
        packed = np.concatenate([np.packbits(render(factors_of(np.arange(i, min(i + 16384, NUM_IMAGES))))
                                             .reshape(-1, SIZE * SIZE), axis=1)
                                 for i in range(0, NUM_IMAGES, 16384)])
        def write(path):
            with open(path, "wb") as f:
                np.savez_compressed(f, packed_imgs=packed)

        atomic_write(cache, write)
    with np.load(cache, allow_pickle=False) as f:
        return f["packed_imgs"]


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The original file's images (N, H, W) uint8 and factor classes (N, F), constant factors
    (dSprites' colour) dropped, with their names: keys ``imgs``, ``latents_classes`` (and
    ``latents_values``); read without unpickling (its ``metadata`` entry is never touched)."""
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} as a .npz file ({e}); give the dSprites file "
                        f"dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz or one with the same keys") from None
    with f:
        missing = [k for k in NPZ_KEYS if k not in f.files]
        if missing:
            raise DataError(f"{path} lacks the keys {missing} of the dSprites file ({', '.join(NPZ_KEYS)}); "
                            f"give a file with images 'imgs' and factor classes 'latents_classes'")
        imgs, classes = f["imgs"], np.asarray(f["latents_classes"], dtype=np.int64)
    if imgs.ndim != 3 or classes.shape != (len(imgs), classes.shape[-1]):
        raise DataError(f"{path}: imgs {imgs.shape} and latents_classes {classes.shape} must be (N, H, W) and (N, F)")
    varying = [j for j in range(classes.shape[1]) if len(np.unique(classes[:, j])) > 1]
    names = (("color", *FACTOR_NAMES) if classes.shape[1] == 6 else
             tuple(f"factor_{j}" for j in range(classes.shape[1])))
    return imgs, classes[:, varying], tuple(names[j] for j in varying)


def downsample(images: np.ndarray, size: int) -> np.ndarray:
    """Binary images (n, H, W) -> (n, size, size) by the mean of each block, rounded (>= 1/2 on)."""
    h = images.shape[-1]
    if size == h:
        return images
    if size <= 0 or h % size:
        raise DataError(f"--image-size {size} must divide dSprites' {h} pixels (e.g. 32 or 16)")
    k = h // size
    blocks = images.reshape(len(images), size, k, size, k).mean(axis=(2, 4))
    return (blocks >= 0.5).astype(np.uint8)


def split_indices(n: int, train_size: int | None, test_size: int | None, seed: int = 0):
    """(train rows, test rows) of a data set of n images: a fixed random permutation; the first
    ``test_size`` (default 10,000, at most a tenth) are the test set, the next ``train_size``
    (default all the rest) the training set, so --train-size takes a random subset."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = test_size or min(10_000, max(1, n // 10))
    n_train = train_size or n - n_test
    if n_test + n_train > n:
        raise DataError(f"--train-size {n_train} and --test-size {n_test} ask for more than the {n} images")
    return perm[n_test : n_test + n_train], perm[:n_test]


def load(name_or_path: str, data_dir: Path, train_size: int | None, test_size: int | None,
         image_size: int | None = None):
    """(x_train, x_test, factors_train, factors_test, factor_names) as numpy arrays, images
    (n, 1, S, S) uint8 in {0, 1}: the procedural grid for ``dsprites``, else the original file."""
    if name_or_path == "dsprites":
        packed = grid_images(data_dir)
        tr, te = split_indices(NUM_IMAGES, train_size, test_size)

        def take(rows):
            return np.unpackbits(packed[rows], axis=1).reshape(-1, SIZE, SIZE), factors_of(rows)

        (x_tr, f_tr), (x_te, f_te), names = take(tr), take(te), FACTOR_NAMES
    else:
        imgs, classes, names = load_npz(Path(name_or_path))
        tr, te = split_indices(len(imgs), train_size, test_size)
        x_tr, f_tr, x_te, f_te = imgs[tr], classes[tr], imgs[te], classes[te]
    if image_size:
        x_tr, x_te = downsample(x_tr, image_size), downsample(x_te, image_size)
    return x_tr[:, None], x_te[:, None], f_tr, f_te, names
