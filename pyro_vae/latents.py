"""Latents for downstream models, in the convention of diffusers' ``AutoencoderKL``.

``encode(model, guide, x).latent_dist`` is q(z|x) as a diagonal Gaussian (``mean``, ``std``,
``sample()``, ``mode()``, ``kl()``) and ``decode(model, z).sample`` is E[x|z], both from traces
of the two Pyro programs (``pyro_vae.applications``: ``latent_codes``, ``decode_mean``), so any
model/guide pair works. ``LatentCodec`` holds a pair and its ``scaling_factor`` as
``AutoencoderKL`` does: a downstream model sees ``z * scaling_factor`` and hands back
``z_scaled / scaling_factor`` to ``decode``.

What a latent is:

- one guide site: its value per row, of any shape (a vector (D,), or a grid (C, H, W) that a
  convolutional second stage keeps as a grid);
- several sites: their values flattened and side by side, (D,) (``Codes.flat``), split back
  with ``LatentLayout.unflat``; the built-ins' faster path (``guide.posterior``,
  ``model.decode``) encodes the guide's first site only, the one ``decode`` takes (``z1`` of
  ``hvae2``), as ``pyro-vae reconstruct`` does;
- the mean is E_q[z|x] (``latent_codes``: closed form, else Monte Carlo); the scale is the
  closed-form standard deviation of the site's distribution where it has one (a Normal; the
  marginal one of a low-rank Gaussian), else the spread of 64 draws (a flow), which
  ``latent_dist`` then treats as a diagonal Gaussian (``exact`` is False). Sites of a layered
  guide are evaluated at the means of the sites drawn before them (``MeanCodes``).
- discrete sites (a class) have no Gaussian latent: refused, with the fix.

``scaling_factor`` is 1 / the standard deviation of the training latents, as Rombach et al. 2022
(the ``scale_factor`` of latent diffusion, ``AutoencoderKL.config.scaling_factor``) define it
on draws z ~ q(z|x): here that of the aggregate posterior q(z) = (1/N) sum_n q(z|x_n) over
every element, in closed form, sd^2 = mean_n,d (std_nd^2 + (mean_nd - m)^2), m the grand mean
(the number the draws estimate, without their noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyro_vae.applications import (
    MeanCodes,
    _has_fast_path,
    decode_mean,
    latent_codes,
    latent_sites,
    take_rows,
    trace_program,
)
from pyro_vae.errors import DataError, ProgramError

LATENTS_FORMAT = "pyro-vae-latents"


@dataclass
class DiagonalGaussian:
    """q(z|x) per row as N(mean, diag std^2) (diffusers' ``DiagonalGaussianDistribution``);
    ``exact`` is False where it moment-matches a non-Gaussian guide."""

    mean: torch.Tensor
    std: torch.Tensor
    exact: bool = True

    @property
    def var(self) -> torch.Tensor:
        return self.std ** 2

    @property
    def logvar(self) -> torch.Tensor:
        return 2 * self.std.log()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per row, summed over the latent's elements."""
        per = 0.5 * (self.mean ** 2 + self.var - 1 - self.logvar)
        return per.reshape(len(per), -1).sum(-1)


@dataclass
class EncoderOutput:
    latent_dist: DiagonalGaussian


@dataclass
class DecoderOutput:
    sample: torch.Tensor


@dataclass
class LatentLayout:
    """Which guide sites a latent holds and each one's per-row shape: ``{"z": [50]}``."""

    sites: dict

    @property
    def shape(self) -> tuple[int, ...]:
        if len(self.sites) == 1:
            return tuple(next(iter(self.sites.values())))
        return (sum(math.prod(s) for s in self.sites.values()),)

    def flat(self, values: dict, n: int) -> torch.Tensor:
        if len(values) == 1:
            return next(iter(values.values())).float()
        return torch.cat([values[name].reshape(n, -1).float() for name in self.sites], -1)

    def unflat(self, z: torch.Tensor) -> dict:
        if len(self.sites) == 1:
            return {next(iter(self.sites)): z}
        out, start = {}, 0
        for name, shape in self.sites.items():
            size = math.prod(shape)
            out[name] = z[:, start:start + size].reshape(len(z), *shape)
            start += size
        return out

    def check(self, z: torch.Tensor, what: str) -> None:
        """One-line error for latents of another shape than this run's."""
        if tuple(z.shape[1:]) != self.shape:
            flat = math.prod(z.shape[1:]) if z.dim() > 1 else 1
            if flat == math.prod(self.shape) and z.dim() == 2:
                return
            raise DataError(f"{what} has latents of shape {tuple(z.shape[1:])} per row, and this run's are "
                             f"{self.shape}: encode with this run (`pyro-vae encode RUN`), or decode with the run "
                             f"that made them")


def _site_std(fn, value_shape, num_samples: int) -> tuple[torch.Tensor, bool]:
    """The standard deviation of a site's distribution (broadcast to its value) and whether it is
    exact for a diagonal Gaussian (a Normal, perhaps in ``Independent``)."""
    base = fn
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    try:
        std = fn.stddev.expand(value_shape)
    except NotImplementedError:
        std = fn.sample((num_samples,)).float().std(0)
    return std, isinstance(base, torch.distributions.Normal)


@torch.no_grad()
def _stds(model, guide, x, num_samples: int, seed: int, **context) -> tuple[dict, bool]:
    """({site: std}, exact) of q(z|x) for the rows of x: ``guide.posterior(x)`` (the faster
    path, the first site), else each site of a guide trace at the codes above it (``MeanCodes``)."""
    if _has_fast_path(model, guide):
        q = guide.posterior(x, **context)
        std, exact = _site_std(q, q.batch_shape + q.event_shape, num_samples)
        return {"z": std}, exact
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        with MeanCodes(num_samples):
            trace = trace_program(guide, x, **context)
    stds, exact = {}, True
    for site in latent_sites(trace):
        stds[site["name"]], ok = _site_std(site["fn"], site["value"].shape, num_samples)
        exact = exact and ok
    return stds, exact


@torch.no_grad()
def encode(model, guide, x: torch.Tensor, num_samples: int = 64, seed: int = 0, chunk: int = 1000,
           **context) -> EncoderOutput:
    """q(z|x) of each row of x as ``EncoderOutput(latent_dist=DiagonalGaussian(mean, std))``
    (diffusers' ``AutoencoderKL.encode(x).latent_dist``): the means are ``latent_codes``'s (so
    ``decode`` of them is ``reconstruct``), the scales computed ``chunk`` rows at a time."""
    codes = latent_codes(model, guide, x, num_samples=num_samples, seed=seed, **context)
    codes.flat("encoding into a Gaussian latent")  # refuses discrete sites, by name
    layout = LatentLayout({k: list(v.shape[1:]) for k, v in codes.values.items()})
    stds, exact = [], True
    for i in range(0, len(x), chunk):
        index = torch.arange(i, min(i + chunk, len(x)), device=x.device)
        s, ok = _stds(model, guide, x[index], num_samples, seed, **take_rows(context, index, len(x)))
        stds.append(layout.flat(dict(zip(codes.values, s.values())), len(index)))
        exact = exact and ok
    return EncoderOutput(DiagonalGaussian(layout.flat(codes.values, len(x)), torch.cat(stds), exact))


def latent_layout(model, guide, x: torch.Tensor, **context) -> LatentLayout:
    """The sites (and their shapes) that ``encode`` puts in a latent, from the codes of x's first row."""
    codes = latent_codes(model, guide, x[:1], **take_rows(context, torch.arange(1, device=x.device), len(x)))
    return LatentLayout({k: list(v.shape[1:]) for k, v in codes.values.items()})


@torch.no_grad()
def decode(model, z: torch.Tensor, like: torch.Tensor, layout: LatentLayout | None = None, chunk: int = 1000,
           **context) -> DecoderOutput:
    """E[x|z] of each row of z (unscaled latents) as ``DecoderOutput(sample=(M, D))``
    (diffusers' ``decode(z).sample``): the model conditioned on the latent sites of ``layout``
    (default: the model's ``decode(z)``, where it has one) on placeholder rows, copies of ``like``'s
    first row (never scored)."""
    if layout is None:
        if not _has_fast_path(model):  # conditioning on a site the model lacks would decode prior draws
            raise ProgramError("decoding a program without a decode(z) method needs the latent sites: pass "
                             "layout=latent_layout(model, guide, x), or use LatentCodec")
        layout = LatentLayout({"z": list(z.shape[1:])})
    layout.check(z, "z")
    z = z.reshape(len(z), *layout.shape)
    out = []
    for i in range(0, len(z), chunk):
        index = torch.arange(i, min(i + chunk, len(z)), device=z.device)
        rows = like[:1].expand(len(index), *like.shape[1:])
        out.append(decode_mean(model, layout.unflat(z[index]), rows, **take_rows(context, index, len(z))))
    return DecoderOutput(torch.cat(out))


def aggregate_statistics(mean: torch.Tensor, std: torch.Tensor) -> dict:
    """Moments of the aggregate posterior q(z) = (1/N) sum_n N(mean_n, diag std_n^2): the
    per-element mean and standard deviation, and ``scaling_factor`` = 1 / its overall standard
    deviation (every element pooled, as latent diffusion's ``scale_factor``)."""
    m, s = mean.double(), std.double()
    per_mean = m.mean(0)
    per_var = (s ** 2).mean(0) + m.var(0, unbiased=False)
    overall = ((s ** 2).mean() + ((m - m.mean()) ** 2).mean()).sqrt()
    return {"latent_mean": per_mean.float(), "latent_std": per_var.sqrt().float(),
            "scaling_factor": float(1.0 / overall)}


@dataclass
class LatentCodec:
    """A trained model/guide pair with the diffusers ``AutoencoderKL`` verbs: ``encode(x)``
    (``.latent_dist``), ``decode(z)`` (``.sample``) and ``scaling_factor``. ``like`` is one data
    row (placeholder for decoding)."""

    model: object
    guide: object
    like: torch.Tensor
    scaling_factor: float = 1.0
    layout: LatentLayout | None = None
    context: dict = field(default_factory=dict)

    def encode(self, x: torch.Tensor, **context) -> EncoderOutput:
        return encode(self.model, self.guide, x, **context)

    def decode(self, z: torch.Tensor, **context) -> DecoderOutput:
        return decode(self.model, z, self.like, self.layout, **context)

    @classmethod
    def from_run(cls, run_dir, device: str = "cpu", best: bool = False, trust_code: bool = False) -> LatentCodec:
        """A run's pair, with the scaling factor of its ``RUN/latents.pt`` (``pyro-vae encode``),
        else of its training latents encoded now."""
        from pyro_vae.applications import open_run, run_context
        from pyro_vae.data import load_run_data

        config, model, guide, device = open_run(run_dir, device, 0, best, trust_code)
        data = load_run_data(config, device, test_size=1, run_dir=run_dir)
        stored = Path(run_dir) / "latents.pt"
        latents = read_latents(stored) if stored.exists() else encode_run(run_dir, device=str(device), best=best,
                                                                          trust_code=trust_code)
        layout = latent_layout(model, guide, data.test, **run_context(model, guide, data))
        return cls(model, guide, data.test[:1], latents["scaling_factor"], layout)


# ----------------------------------------------------------------------------------------------
# a run directory: `pyro-vae encode` and `pyro-vae decode`


def _training_rows(data, seed: int) -> torch.Tensor:
    """The training rows as training saw them: binarized once, seeded, where the data are."""
    g = torch.Generator(device=data.train.device).manual_seed(seed)
    return torch.bernoulli(data.train, generator=g) if data.binarize else data.train


def encode_run(run_dir, data=None, seed: int = 0, device: str = "auto", best: bool = False,
               trust_code: bool = False, train_size: int | None = None) -> dict:
    """The latents file of a run, as a dict that ``torch.load(..., weights_only=True)`` reads:

    - ``train``, ``test`` (and with ``data``, a .npy/.pt file, ``data``): ``{"mean", "std"}``
      (rows, *shape) of q(z|x), and ``labels`` where the data have them;
    - ``scaling_factor``, ``latent_mean``, ``latent_std``: ``aggregate_statistics`` of the
      training latents;
    - ``kind`` ("gaussian"; a VQ-VAE's run writes "codes", its splits ``{"codes": indices}``, and
      ``num_codes``, without means, scales or statistics),
      ``sites`` ({site: shape}), ``shape``, ``exact`` (closed-form scales), ``run``, ``epoch``,
      ``best`` (the checkpoint the latents come from), ``context`` (what the programs take
      besides x: ``["y"]`` for a class-conditional model).
    """
    from pyro_vae.applications import open_run, run_context
    from pyro_vae.data import load_points, load_run_data
    from pyro_vae.programs import context_keys
    from pyro_vae.run import load_checkpoint

    config, model, guide, device = open_run(run_dir, device, seed, best, trust_code)
    d = load_run_data(config, device, train_size=train_size or config.train_size, run_dir=run_dir)
    splits = {"train": (_training_rows(d, seed), d.train_labels), "test": (d.test, d.test_labels)}
    if data is not None:
        if run_context(model, guide, d):
            raise DataError("--data has no labels, and this run's model takes labels as context: encode its own data")
        splits["data"] = (load_points(data, d.x_dim, model=model, standardization=d.standardization).to(device), None)
    out: dict = {"format": LATENTS_FORMAT, "version": 1, "kind": "gaussian", "run": str(run_dir),
                 "epoch": int(load_checkpoint(run_dir, "cpu", best)["epoch"]), "best": best}
    if callable(getattr(guide, "encode_codes", None)):  # a VQ-VAE: code indices, not a Gaussian
        return _encode_codes(out, guide, splits, model)
    for name, (x, labels) in splits.items():
        context = run_context(model, guide, d, which=name) if name != "data" else {}
        q = encode(model, guide, x, seed=seed, **context).latent_dist
        out[name] = {"mean": q.mean.cpu(), "std": q.std.cpu()}
        if labels is not None:
            out[name]["labels"] = labels.cpu()
        out["exact"] = out.get("exact", True) and q.exact
    layout = latent_layout(model, guide, d.test, **run_context(model, guide, d))
    out.update(sites=layout.sites, shape=list(layout.shape), context=list(context_keys(model, guide)))
    out.update(aggregate_statistics(out["train"]["mean"], out["train"]["std"]))
    return out


def _encode_codes(out: dict, guide, splits: dict, model) -> dict:
    """The latents file of a VQ-VAE run: ``kind`` "codes", each split ``{"codes": (rows, H, W) long}``
    (and ``labels``), ``num_codes``; ``scaling_factor`` 1 (indices are not scaled)."""
    for name, (x, labels) in splits.items():
        codes = torch.cat([guide.encode_codes(x[i:i + 1000]) for i in range(0, len(x), 1000)])
        out[name] = {"codes": codes.cpu()}
        if labels is not None:
            out[name]["labels"] = labels.cpu()
    shape = list(out["train"]["codes"].shape[1:])
    out.update(kind="codes", num_codes=int(guide.codebook.num_codes), sites={"codes": shape}, shape=shape,
               exact=True, context=[], scaling_factor=1.0)
    return out


def save_latents(latents: dict, path) -> Path:
    from pyro_vae.files import save_tensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_tensors(latents, path)


def read_latents(path) -> dict | torch.Tensor:
    """A latents file of ``encode`` (a dict), or a plain tensor (.pt, .npy) of latents (rows, ...)."""
    import numpy as np

    path = Path(path)
    if not path.exists():
        raise DataError(f"no latents file at {path}: write one with `pyro-vae encode RUN --out {path}`")
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False)).float()
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise DataError(f"cannot read {path} as latents ({type(e).__name__}): give a file of "
                         f"`pyro-vae encode` or a tensor saved with torch.save") from None
    if torch.is_tensor(value):
        return value.float()
    if isinstance(value, dict) and value.get("format") == LATENTS_FORMAT:
        return value
    raise DataError(f"{path} holds neither a tensor of latents nor a file of `pyro-vae encode`")
