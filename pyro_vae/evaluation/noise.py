"""Chunk-invariant random draws for the evaluation.

Every latent draw comes from a generator seeded by (seed, site, data point, block of
``PARTICLE_BLOCK`` particles), so each (point, particle) gets the same z however the work is
chunked into data points x particles.
"""

from __future__ import annotations

import warnings
import zlib

import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyro_vae.errors import ProgramError
from pyro_vae.objectives.base import PARTICLE_PLATE

PARTICLE_BLOCK = 128  # particles per seeded noise block; particle chunks are multiples of it
_MASK64 = (1 << 64) - 1


def _splitmix64(*values: int) -> int:
    """A 63-bit seed mixing the given integers (splitmix64 finaliser, chained)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h >> 1


def _location_scale(fn):
    """(loc, scale_or_tril, kind) of a Normal / MultivariateNormal site distribution, else None."""
    while isinstance(fn, (dist.Independent, dist.MaskedDistribution)):
        fn = fn.base_dist
    if isinstance(fn, dist.Normal):
        return fn.loc, fn.scale, "normal"
    if isinstance(fn, dist.MultivariateNormal):
        return fn.loc, fn.scale_tril, "mvn"
    return None


_WARNED: set = set()


class BlockNoise(Messenger):
    """Sample every latent site of a Gaussian guide from noise that depends only on
    (seed, site name, global data index, particle index).

    The noise of data point ``i`` and particles ``[b * B, (b + 1) * B)`` (``B = PARTICLE_BLOCK``)
    is ``randn`` from a generator seeded with hash(seed, site, i, b), so a chunk of points and
    particles draws exactly what the unchunked run draws for them. Sites must sit inside the
    ``data`` plate (and the particle plate, if any). Normal and MultivariateNormal sites are
    reparameterised (loc + scale * eps), low-rank Gaussians as loc + W eps_w + sqrt(d) eps_d
    (two noise streams, as torch draws them), and a flow on a Gaussian (``iaf``) by pushing its
    base draw through the transforms; other families fall back to Pyro's global RNG with a
    warning, and lose the chunk invariance.

    Use it outside the particle and data plates (``with BlockNoise(...): traces(...)``), so the
    plates have broadcast each site's distribution before it draws.
    """

    def __init__(self, seed: int, data_index, particle_offset: int = 0, repeats: int = 0):
        super().__init__()
        self.seed = int(seed)
        self.data_index = [int(i) for i in data_index]
        self.particle_offset = int(particle_offset)
        self.repeats = int(repeats)  # REPEATED layout: the data dim holds ``repeats`` copies of the points
        self._generators: dict = {}

    @property
    def rows(self) -> int:
        """Entries of the data dim: the points, or in the REPEATED layout particles x points."""
        return len(self.data_index) * max(1, self.repeats)

    def _generator(self, device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device)
        return self._generators[key]

    def noise(self, site: str, shape, data_dim: int, particle_dim: int | None, device, dtype):
        """Standard normal noise of ``shape`` (data and particle dims at the given positions)."""
        shape = list(shape)
        n_particles = shape[particle_dim] if particle_dim is not None else max(1, self.repeats)
        rest = [s for a, s in enumerate(shape) if a not in (data_dim, particle_dim)]
        if shape[data_dim] != self.rows:
            raise ValueError(f"site {site!r} has {shape[data_dim]} data points, BlockNoise was given "
                             f"{self.rows} rows")
        first = self.particle_offset // PARTICLE_BLOCK
        last = (self.particle_offset + n_particles - 1) // PARTICLE_BLOCK
        start = self.particle_offset - first * PARTICLE_BLOCK
        out = torch.empty(len(self.data_index), (last - first + 1) * PARTICLE_BLOCK, *rest,
                          device=device, dtype=dtype)
        g, site_key = self._generator(device), zlib.crc32(site.encode())
        for row, i in enumerate(self.data_index):
            for col, b in enumerate(range(first, last + 1)):
                g.manual_seed(_splitmix64(self.seed, site_key, i, b))
                torch.randn(PARTICLE_BLOCK, *rest, generator=g, device=device, dtype=dtype,
                            out=out[row, col * PARTICLE_BLOCK:(col + 1) * PARTICLE_BLOCK])
        eps = out[:, start:start + n_particles]
        if particle_dim is None and self.repeats:  # row j * B + i: point i's particle j, as vectorized
            return torch.movedim(eps.transpose(0, 1).reshape(-1, *rest), 0, data_dim)
        if particle_dim is None:
            return torch.movedim(eps[:, 0], 0, data_dim)
        return torch.movedim(eps, (0, 1), (data_dim, particle_dim))

    def _pyro_sample(self, msg):
        if (msg["is_observed"] or msg["value"] is not None or msg["infer"].get("enumerate")
                or site_is_subsample(msg)):
            return
        fn = msg["fn"]
        batch = len(fn.batch_shape)
        dims = {f.name: batch + f.dim for f in msg["cond_indep_stack"]}
        data_plate = self._data_plate(msg)
        if data_plate is None:
            raise ProgramError(f"latent site {msg['name']!r} is not inside a plate over the "
                             f"{self.rows} data points: evaluation needs per-data-point "
                             f"latents (as in VAEs)")
        dims["data"] = dims[data_plate]
        value = self._draw(msg["name"], fn, dims)
        if value is None:
            if (msg["name"], type(fn)) not in _WARNED:  # once per site and family, not per chunk
                _WARNED.add((msg["name"], type(fn)))
                warnings.warn(f"site {msg['name']!r} has a {type(fn).__name__} distribution; its draws "
                              f"use the global RNG, so chunked and unchunked evaluation differ",
                              stacklevel=2)
            return
        # the same tensor where no broadcast is needed: a flow's transforms cache it for log_prob
        msg["value"] = value if value.shape == fn.shape() else value.expand(fn.shape())

    def _data_plate(self, msg) -> str | None:
        """The plate over the data points: of the site's plates of that size, the one named
        ``data`` if there is one, else the outermost."""
        frames = sorted((f for f in msg["cond_indep_stack"]
                         if f.name != PARTICLE_PLATE and f.size == self.rows), key=lambda f: f.dim)
        names = [f.name for f in frames]
        return "data" if "data" in names else (names[0] if names else None)

    def _draw(self, name: str, fn, dims: dict):
        """A reparameterised draw of ``fn`` from the block noise, or None for other families."""
        transforms = []
        if isinstance(fn, dist.TransformedDistribution):
            transforms, fn = fn.transforms, fn.base_dist

        def eps(key, shape, like):
            return self.noise(key, shape, dims["data"], dims.get(PARTICLE_PLATE), like.device, like.dtype)

        params = _location_scale(fn)
        if params is not None:
            loc, scale, kind = params
            e = eps(name, fn.shape(), loc)
            value = loc + scale * e if kind == "normal" else loc + (scale @ e.unsqueeze(-1)).squeeze(-1)
        elif isinstance(fn, torch.distributions.LowRankMultivariateNormal):
            e_w = eps(f"{name}/factor", fn.batch_shape + fn.cov_factor.shape[-1:], fn.loc)
            e_d = eps(name, fn.shape(), fn.loc)
            value = fn.loc + (fn.cov_factor @ e_w.unsqueeze(-1)).squeeze(-1) + fn.cov_diag.sqrt() * e_d
        else:
            return None
        for transform in transforms:  # a flow: the base draw pushed through (and cached for log_prob)
            value = transform(value)
        return value

