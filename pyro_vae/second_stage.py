"""Second stages: a prior learned on a trained VAE's latents, replacing N(0, I) at sampling time.

The N(0, I) prior of a VAE covers regions that the aggregate posterior q(z) = (1/N) sum_n q(z|x_n)
never visits, and those decode to poor samples (the "prior hole"; Dai & Wipf 2019, "Diagnosing
and enhancing VAE models", fit a second VAE to q(z); Rombach et al. 2022 a diffusion model).
A second stage is fitted to the scaled training latents z * scaling_factor (``pyro_vae.latents``)
and sampled from, then decoded by the VAE's decoder.

Kinds (``LATENT_PRIORS``, one verb set, scikit-learn style: ``fit``, ``sample``; saved with
``save_prior`` and read back with ``load_prior``, as tensors that ``torch.load(...,
weights_only=True)`` reads):

- ``gmm``: a Gaussian mixture fitted by EM to the posterior means (pythae's
  ``GaussianMixtureSampler``, the simple baseline);
- ``diffusion``: DDPM (Ho et al. 2020) with epsilon prediction and the cosine schedule (Nichol &
  Dhariwal 2021), trained on draws z ~ q(z|x), sampled with a respaced schedule (DDIM update,
  Song et al. 2021, deterministic by default; ``eta=1`` is ancestral DDPM sampling): an MLP with a time embedding for
  vector latents, a small U-Net for latent grids (C, H, W).

A kind is an ``nn.Module`` with ``options()`` (its constructor's JSON-able arguments),
``fit(latents)`` and ``sample(n, generator)``; its parameters and buffers are its state. A
VQ-VAE's autoregressive code prior, ``pixelcnn`` (``pyro_vae/pixelcnn.py``), is a kind whose ``fit``
reads ``Latents.codes`` (``takes_codes``); kinds and latents that do not match are refused.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pyro_vae.errors import ConfigError, DataError, UserError
from pyro_vae.registry import Registry

LATENT_PRIORS = Registry("latent prior")
PRIOR_FORMAT = "pyro-vae-latent-prior"
PRIORS_DIR = "priors"


class PriorError(UserError, ValueError):
    """A second stage that is missing, damaged or fitted to other latents than the run's."""


@dataclass
class Latents:
    """What a second stage is fitted to, in scaled units: q(z|x) per training row as ``mean``
    and ``std`` (rows, *shape); ``codes`` (rows, ...) of a VQ-VAE instead, and ``labels`` where known."""

    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def draw(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ q(z|x) for the rows ``index``: a sample of the aggregate posterior."""
        m, s = self.mean[index], self.std[index]
        return m + s * torch.randn(m.shape, generator=generator, device=m.device, dtype=m.dtype)


# ----------------------------------------------------------------------------------------------
# gmm


@LATENT_PRIORS.register("gmm")
class GaussianMixturePrior(nn.Module):
    """p(z) = sum_k pi_k N(mu_k, Sigma_k), full covariances, fitted by EM (Dempster et al. 1977)
    to the posterior means, as pythae's ``GaussianMixtureSampler`` (Ghosh et al. 2020, "From
    variational to deterministic autoencoders", ex-post density estimation). k-means++ starts,
    ``reg`` added to each covariance's diagonal (scikit-learn's ``reg_covar``)."""

    def __init__(self, shape, components: int = 10, iterations: int = 100, reg: float = 1e-6, seed: int = 0):
        super().__init__()
        self.shape, self.components, self.iterations, self.reg, self.seed = list(shape), components, iterations, reg, seed
        d = math.prod(shape)
        self.register_buffer("logits", torch.zeros(components))
        self.register_buffer("loc", torch.zeros(components, d))
        self.register_buffer("scale_tril", torch.eye(d).expand(components, d, d).clone())

    def options(self) -> dict:
        return {"shape": self.shape, "components": self.components, "iterations": self.iterations,
                "reg": self.reg, "seed": self.seed}

    def distribution(self) -> torch.distributions.Distribution:
        return torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(logits=self.logits),
            torch.distributions.MultivariateNormal(self.loc, scale_tril=self.scale_tril))

    @torch.no_grad()
    def fit(self, latents: Latents, progress: bool = False) -> dict:
        z = latents.mean.reshape(len(latents.mean), -1).double()
        n, d = z.shape
        k = self.components
        if n < k:
            raise DataError(f"a {k}-component mixture needs at least {k} latents, got {n}")
        g = torch.Generator(device=z.device).manual_seed(self.seed)
        centres = z[torch.randint(n, (1,), generator=g, device=z.device)]
        for _ in range(1, k):  # k-means++ (Arthur & Vassilvitskii 2007)
            d2 = torch.cdist(z, centres).min(1).values ** 2
            centres = torch.cat([centres, z[torch.multinomial(d2 / d2.sum(), 1, generator=g)]])
        resp = nn.functional.one_hot(torch.cdist(z, centres).argmin(1), k).double()
        eye = torch.eye(d, dtype=z.dtype, device=z.device)
        previous, done = -math.inf, 0
        while done < self.iterations:
            done += 1
            # M step: weights, means and covariances from the responsibilities
            nk = resp.sum(0) + 1e-10
            loc = (resp.T @ z) / nk[:, None]
            diff = z[None] - loc[:, None]  # (k, n, d)
            cov = (resp.T[..., None] * diff).transpose(1, 2) @ diff / nk[:, None, None] + self.reg * eye
            # E step: responsibilities, and the mean log-likelihood to watch
            tril = torch.linalg.cholesky(cov)
            maha = torch.linalg.solve_triangular(tril, diff.transpose(1, 2), upper=False).pow(2).sum(1)  # (k, n)
            log_det = tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            log_joint = (-0.5 * (maha + d * math.log(2 * math.pi)) - log_det[:, None] + (nk / n).log()[:, None]).T
            log_lik = torch.logsumexp(log_joint, -1)
            resp = (log_joint - log_lik[:, None]).exp()
            mean_ll = float(log_lik.mean())
            if abs(mean_ll - previous) < 1e-6 * max(1.0, abs(mean_ll)):
                break
            previous = mean_ll
        self.logits.copy_((nk / n).log().float())
        self.loc.copy_(loc.float())
        self.scale_tril.copy_(tril.float())
        return {"iterations": done, "mean_log_likelihood": mean_ll}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, **_) -> torch.Tensor:
        k = torch.multinomial(self.logits.softmax(0), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.loc.shape[1], 1, generator=generator, device=self.loc.device)
        z = self.loc[k] + (self.scale_tril[k] @ eps).squeeze(-1)
        return z.reshape(n, *self.shape)


# ----------------------------------------------------------------------------------------------
# diffusion


def cosine_alpha_bar(num_steps: int, s: float = 0.008) -> torch.Tensor:
    """alpha_bar_t, t = 1..T, of the cosine schedule (Nichol & Dhariwal 2021, eq. 17):
    f(t) = cos^2((t/T + s)/(1 + s) * pi/2), alpha_bar_t = f(t)/f(0), with each
    beta_t = 1 - alpha_bar_t/alpha_bar_{t-1} clipped at 0.999."""
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0)


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) time steps t (Vaswani et al. 2017; Ho et al. 2020)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], -1)


class ResidualMLP(nn.Module):
    """eps(z_t, t) for vector latents: z -> Linear -> ``blocks`` residual blocks
    h + W2 SiLU(W1 SiLU(LayerNorm(h)) + E t) -> LayerNorm -> Linear, the time embedding E t added inside each block."""

    def __init__(self, dim: int, hidden: int = 512, blocks: int = 3, time_dim: int = 128):
        super().__init__()
        self.time_dim = time_dim
        self.time = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(blocks))
        self.first = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(blocks))
        self.second = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time(time_embedding(t, self.time_dim))
        h = self.inp(z)
        for norm, first, second in zip(self.norms, self.first, self.second):
            h = h + second(nn.functional.silu(first(nn.functional.silu(norm(h))) + emb))
        return self.out(h)


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(min(8, c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(emb, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(min(8, c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(nn.functional.silu(self.norm1(x))) + self.time(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(nn.functional.silu(self.norm2(h)))


class SmallUNet(nn.Module):
    """eps(z_t, t) for latent grids (C, H, W), H and W even: a residual block at each of two
    resolutions down, one in the middle and two up with skip connections (Ronneberger et al. 2015,
    as in Ho et al. 2020 at a small size), the time embedding added in every block."""

    def __init__(self, channels: int, width: int = 64, time_dim: int = 128):
        super().__init__()
        self.time_dim, c, emb = time_dim, width, 4 * width
        self.time = nn.Sequential(nn.Linear(time_dim, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Conv2d(channels, c, 3, padding=1)
        self.down1, self.down = _ResBlock(c, c, emb), nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.down2, self.mid = _ResBlock(c, 2 * c, emb), _ResBlock(2 * c, 2 * c, emb)
        self.up2, self.up = _ResBlock(4 * c, c, emb), nn.Upsample(scale_factor=2, mode="nearest")
        self.up1 = _ResBlock(2 * c, c, emb)
        self.out = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time(time_embedding(t, self.time_dim))
        h1 = self.down1(self.inp(z), emb)
        h2 = self.down2(self.down(h1), emb)
        h = self.up2(torch.cat([self.mid(h2, emb), h2], 1), emb)
        return self.out(self.up1(torch.cat([self.up(h), h1], 1), emb))


@LATENT_PRIORS.register("diffusion")
class DiffusionPrior(nn.Module):
    """A denoising diffusion model of the scaled latents (Ho et al. 2020, "Denoising diffusion
    probabilistic models"): z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps with the cosine schedule
    over ``timesteps`` T, and eps_theta(z_t, t) trained on E ||eps - eps_theta||^2 (the simple
    loss), z_0 a fresh draw from q(z|x) at every step. The weights sampled with are an exponential
    moving average (decay ``ema``) of the trained ones. Vector latents get ``ResidualMLP``, grids
    (C, H, W) ``SmallUNet`` (``hidden`` is the MLP's width, or the U-Net's channels)."""

    def __init__(self, shape, hidden: int = 256, blocks: int = 3, timesteps: int = 1000, train_steps: int = 10000,
                 batch_size: int = 512, lr: float = 1e-3, ema: float = 0.999, seed: int = 0):
        super().__init__()
        self.shape, self.hidden, self.blocks, self.timesteps = list(shape), hidden, blocks, timesteps
        self.train_steps, self.batch_size, self.lr, self.ema, self.seed = train_steps, batch_size, lr, ema, seed
        if len(shape) == 1:
            self.net = ResidualMLP(shape[0], hidden, blocks)
        elif len(shape) == 3 and shape[1] % 2 == 0 and shape[2] % 2 == 0:
            self.net = SmallUNet(shape[0], hidden)
        else:
            raise DataError(f"a diffusion prior takes vector latents (D,) or grids (C, H, W) of even H and W; "
                             f"these are {tuple(shape)}")
        self.register_buffer("alpha_bar", cosine_alpha_bar(timesteps).float())
        self.register_buffer("bound", torch.tensor(math.inf))  # |z_0| seen in training, for clipping

    def options(self) -> dict:
        return {"shape": self.shape, "hidden": self.hidden, "blocks": self.blocks, "timesteps": self.timesteps,
                "train_steps": self.train_steps, "batch_size": self.batch_size, "lr": self.lr, "ema": self.ema,
                "seed": self.seed}

    def loss(self, z0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The simple loss of Ho et al.: E_{t, eps} ||eps - eps_theta(z_t, t)||^2 per element."""
        t = torch.randint(self.timesteps, (len(z0),), generator=generator, device=z0.device)
        eps = torch.randn(z0.shape, generator=generator, device=z0.device)
        abar = self.alpha_bar[t].reshape(-1, *[1] * (z0.dim() - 1))
        zt = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
        return ((self.net(zt, t) - eps) ** 2).mean()

    def fit(self, latents: Latents, progress: bool = False) -> dict:
        """Adam on the simple loss for ``train_steps`` batches of fresh draws z ~ q(z|x), the
        learning rate decayed to 0 on a cosine; the EMA weights are kept."""
        import copy

        torch.manual_seed(self.seed)
        g = torch.Generator(device=latents.mean.device).manual_seed(self.seed)
        ema_net = copy.deepcopy(self.net).requires_grad_(False)
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.train_steps)
        n, losses, t0 = len(latents.mean), [], time.perf_counter()
        self.net.train()
        for step in range(self.train_steps):
            z0 = latents.draw(torch.randint(n, (min(self.batch_size, n),), generator=g, device=latents.mean.device), g)
            loss = self.loss(z0, g)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                for e, p in zip(ema_net.parameters(), self.net.parameters()):
                    e.lerp_(p, 1 - self.ema)
            losses.append(loss.detach())
            if progress and (step + 1) % 1000 == 0:
                print(f"  step {step + 1}/{self.train_steps}: loss {float(torch.stack(losses[-1000:]).mean()):.4f}",
                      flush=True)
        self.net.load_state_dict(ema_net.state_dict())
        self.net.eval()
        bound = (latents.mean.abs() + 4 * latents.std).max()
        self.bound.fill_(float(bound))
        last = torch.stack(losses[-max(1, self.train_steps // 10):]).mean()
        return {"final_loss": float(last), "seconds": time.perf_counter() - t0, "steps": self.train_steps}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, steps: int = 50, eta: float = 0.0,
               batch_size: int = 10_000) -> torch.Tensor:
        """n draws by the generalized (DDIM, Song et al. 2021) update on ``steps`` evenly spaced
        time steps of the T trained ones (respacing, Nichol & Dhariwal 2021): from z_t,
        z0_hat = (z_t - sqrt(1 - abar_t) eps)/sqrt(abar_t) (clipped to the training range), then
        z_s = sqrt(abar_s) z0_hat + sqrt(1 - abar_s - sigma^2) eps + sigma noise, with
        sigma = eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t/abar_s); ``eta=1`` is
        ancestral DDPM sampling on the respaced chain, ``eta=0`` (the default) deterministic DDIM,
        which gave the better samples on MNIST latents (Frechet distance 29 against 48 with
        ``eta=1``, the same at 50, 100 and 250 steps; benchmarks/results/latent_diffusion.md)."""
        if not 1 <= steps <= self.timesteps:
            raise ConfigError(f"--denoising-steps must lie in 1..{self.timesteps} (the trained time steps), got {steps}")
        self.eval()
        device = self.alpha_bar.device
        times = torch.linspace(self.timesteps - 1, 0, steps, device=device).round().long()
        out = []
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            z = torch.randn(m, *self.shape, generator=generator, device=device)
            for i, t in enumerate(times):
                abar = self.alpha_bar[t]
                abar_prev = self.alpha_bar[times[i + 1]] if i + 1 < len(times) else torch.ones((), device=device)
                eps = self.net(z, t.expand(m))
                z0 = ((z - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-self.bound, self.bound)
                eps = (z - abar.sqrt() * z0) / (1 - abar).sqrt()
                sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).clamp(min=0).sqrt()
                z = abar_prev.sqrt() * z0 + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
                if i + 1 < len(times):
                    z = z + sigma * torch.randn(z.shape, generator=generator, device=device)
            out.append(z)
        return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# saving and loading (in RUN/priors/KIND.pt)


def prior_path(run_dir, kind: str) -> Path:
    return Path(run_dir) / PRIORS_DIR / f"{kind}.pt"


def save_prior(prior: nn.Module, path, latents_info: dict, fit_info: dict | None = None) -> Path:
    """Write ``prior`` atomically as tensors and plain values (``weights_only``-readable): its
    kind, options, state, what it was fitted to (``latents_info``: scaling factor, shape, sites,
    the VAE checkpoint's epoch) and how the fit went."""
    from pyro_vae.files import save_tensors

    kind = next(name for name in LATENT_PRIORS.names() if LATENT_PRIORS.get(name) is type(prior))
    state = {"format": PRIOR_FORMAT, "version": 1, "kind": kind, "options": prior.options(),
             "state": {k: v.detach().cpu() for k, v in prior.state_dict().items()},
             "latents": latents_info, "fit": fit_info or {}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_tensors(state, path)


def load_prior(path, device="cpu") -> tuple[nn.Module, dict]:
    """(prior, record) from a file of ``save_prior``, read with ``weights_only=True``; only the
    registered kinds are built (a prior file imports no code)."""
    path = Path(path)
    try:
        record = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise PriorError(f"cannot read the prior {path} ({type(e).__name__}): the file is damaged or not a "
                         f"pyro-vae prior; fit it again with `pyro-vae prior RUN --kind KIND`") from None
    if not isinstance(record, dict) or record.get("format") != PRIOR_FORMAT:
        raise PriorError(f"{path} is not a pyro-vae latent prior; fit one with `pyro-vae prior RUN --kind KIND`")
    kind = record["kind"]
    if kind not in LATENT_PRIORS:
        raise PriorError(f"{path} is a prior of kind {kind!r}, which this version does not know "
                         f"(known: {', '.join(LATENT_PRIORS.names())})")
    prior = LATENT_PRIORS.get(kind)(**record["options"])
    prior.load_state_dict(record["state"])
    return prior.to(device).eval(), record


# ----------------------------------------------------------------------------------------------
# a run directory: `pyro-vae prior` and `pyro-vae sample --prior`


def fit_prior_run(run_dir, kind: str = "diffusion", options: dict | None = None, seed: int = 0,
                  device: str = "auto", best: bool = False, trust_code: bool = False, progress: bool = False) -> dict:
    """Encode a run's training rows (``pyro_vae.latents.encode_run``), fit a second stage of
    ``kind`` with ``options`` to the scaled latents and save it as ``RUN/priors/KIND.pt``.
    Returns what the fit reported, with ``path``."""
    from pyro_vae.distributed import resolve_device
    from pyro_vae.latents import encode_run

    cls = LATENT_PRIORS.get(kind) if kind in LATENT_PRIORS else None
    if cls is None:
        raise PriorError(f"unknown latent prior kind {kind!r}; known: {', '.join(LATENT_PRIORS.names())}")
    encoded = encode_run(run_dir, seed=seed, device=device, best=best, trust_code=trust_code)
    if encoded["context"]:
        raise PriorError(f"{run_dir}'s model takes {encoded['context']} as context, and a second-stage prior is "
                         f"unconditional: fit it to a run of an unconditional model")
    device = torch.device(resolve_device(device))
    scale = encoded["scaling_factor"]
    codes = encoded["kind"] == "codes"
    if codes != bool(getattr(cls, "takes_codes", False)):
        takes = [k for k in LATENT_PRIORS.names() if bool(getattr(LATENT_PRIORS.get(k), "takes_codes", False)) == codes]
        raise PriorError(f"{run_dir}'s latents are {'code indices (a VQ-VAE)' if codes else 'Gaussian'}, and a {kind} "
                         f"prior is fitted to {'Gaussian latents' if codes else 'code indices'}: use --kind "
                         f"{' or '.join(takes)}")
    if codes:
        latents = Latents(codes=encoded["train"]["codes"].to(device), labels=encoded["train"].get("labels"))
        options = {"num_codes": encoded["num_codes"], **(options or {})}
    else:
        latents = Latents(encoded["train"]["mean"].to(device) * scale, encoded["train"]["std"].to(device) * scale,
                          labels=encoded["train"].get("labels"))
    prior = cls(encoded["shape"], seed=seed, **(options or {})).to(device)
    info = prior.fit(latents, progress=progress)
    record = {k: encoded[k] for k in ("scaling_factor", "shape", "sites", "epoch", "best", "kind")}
    path = save_prior(prior, prior_path(run_dir, kind), record, info)
    return {**info, "path": str(path), "latents": len(latents.codes if codes else latents.mean), "scaling_factor": scale}


def open_prior(run_dir, kind: str, device="cpu", best: bool = False) -> tuple[nn.Module, dict]:
    """The second stage ``kind`` of a run, checked against the run's checkpoint: a prior fitted
    to another epoch's latents (the run trained on since) is refused, with the fix."""
    from pyro_vae.run import load_checkpoint

    path = prior_path(run_dir, kind)
    if not path.exists():
        fitted = sorted(p.stem for p in (Path(run_dir) / PRIORS_DIR).glob("*.pt"))
        have = f"it has {', '.join(fitted)}" if fitted else "it has none"
        raise PriorError(f"{run_dir} has no {kind} prior ({have}): fit one with `pyro-vae prior {run_dir} --kind {kind}`")
    prior, record = load_prior(path, device)
    epoch = int(load_checkpoint(run_dir, "cpu", best)["epoch"])
    if record["latents"]["epoch"] != epoch or bool(record["latents"]["best"]) != best:
        which = "best.pt" if best else "checkpoint.pt"
        raise PriorError(f"the {kind} prior of {run_dir} was fitted to the latents of epoch {record['latents']['epoch']}"
                         f"{' (best.pt)' if record['latents']['best'] else ''}, and its {which} is epoch {epoch}: "
                         f"fit it again with `pyro-vae prior {run_dir} --kind {kind}{' --best' if best else ''}`")
    return prior, record


@torch.no_grad()
def sample_latents(prior: nn.Module, record: dict, n: int, seed: int = 0, **options) -> torch.Tensor:
    """n unscaled latents from a second stage: its draws divided by the scaling factor."""
    device = next(iter(prior.buffers())).device
    g = torch.Generator(device=device).manual_seed(seed)
    if record["latents"].get("kind") == "codes":  # code indices (a VQ-VAE's) are not scaled
        return prior.sample(n, generator=g, **options)
    return prior.sample(n, generator=g, **options) / record["latents"]["scaling_factor"]


from pyro_vae import pixelcnn  # noqa: E402,F401 - registers "pixelcnn", the VQ-VAE's code prior
