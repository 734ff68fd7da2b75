"""Vector quantization for the VQ-VAE (van den Oord et al. 2017, "Neural discrete representation
learning"): a codebook that stays alive, its conv grid networks, and the point mass over codes.

The codebook {e_k}, k = 1..K, holds D-dim vectors. An encoder output z_e (a grid of D-dim vectors)
is replaced, position by position, by its nearest code z_q = e_{k*}, k* = argmin_k ||z_e - e_k||^2.

- **Gradient to the encoder**: straight-through, z = z_e + sg(z_q - z_e) (value z_q, gradient
  that of z_e), or the rotation trick (Fifty et al. 2024, "Restructuring vector quantization with
  the rotation trick"): z = sg(lambda R) z_e with R the rotation taking z_e/|z_e| to z_q/|z_q| and
  lambda = |z_q|/|z_e|, so the value is z_q and the gradient keeps the angle between z_e and z_q.
- **EMA updates** (van den Oord et al. 2017, app. A.1): per training step n_k = #{z_e -> k},
  s_k = sum_{z_e -> k} z_e; N_k <- g N_k + (1 - g) n_k, m_k <- g m_k + (1 - g) s_k, e_k = m_k / N~_k
  with Laplace smoothing N~_k = (N_k + eps) / (N + K eps) N, N = sum_k N_k (as Sonnet). The
  alternative (``update="loss"``) learns e_k by the codebook loss ||sg(z_e) - z_q||^2.
- **k-means init** (as vector-quantize-pytorch's ``kmeans_init``): Lloyd's algorithm on the
  encoder outputs of the first training batch, started by k-means++ seeding.
- **Dead-code restarts** (Dhariwal et al. 2020, Jukebox; Zeghidour et al. 2021): after each EMA
  update every code with N_k below ``restart_threshold`` is re-seeded at an encoder output of
  the batch drawn at random, with N_k = 2 * threshold (so it has about 70 steps to be used).
- **Data parallel**: n_k and s_k are all-reduced, and the first batch (for k-means) and the batch a
  restart draws from are all-gathered, in rank order, under ``torch.distributed``: every rank
  holds the codebook one process would hold on the same global batch. Random choices come from a
  generator seeded by (seed, step), the same on every rank, apart from the global RNG.

The updates run in a backward hook on z_e: once per training step that back-propagates through the
guide, and never for the forward-only traces the toolkit makes to check programs (``--jit``, which
replays a trace without Python hooks, is refused for the VQ-VAE).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from pyro.distributions import TorchDistribution
from torch import nn
from torch.distributions import constraints

from pyro_vae.errors import ConfigError
from pyro_vae.nets import CONV_CHANNELS, _conv_grid, activation

UPDATES = ("ema", "loss")
GRADIENTS = ("straight-through", "rotation")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


def _all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of t, concatenated in rank order (ranks may hold different numbers of rows)."""
    if not _distributed():
        return t
    n = torch.tensor([len(t)], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    biggest = int(max(s.item() for s in sizes))
    padded = torch.zeros(biggest, *t.shape[1:], dtype=t.dtype, device=t.device)
    padded[:len(t)] = t
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:int(s.item())] for o, s in zip(out, sizes)])


def kmeans(x: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(centres (k, D), cluster sizes (k,)) of Lloyd's algorithm on the rows of x, started by
    k-means++ seeding (Arthur & Vassilvitskii 2007: each next centre a row drawn with probability
    proportional to its squared distance from the nearest centre so far); an empty cluster keeps
    its centre. Draws come from ``generator`` (on the CPU)."""
    first = int(torch.randint(len(x), (1,), generator=generator))
    centres = [x[first]]
    d2 = (x - x[first]).pow(2).sum(1)
    for _ in range(1, k):
        weights = d2.double().cpu()
        pick = (int(torch.multinomial(weights / weights.sum(), 1, generator=generator)) if weights.sum() > 0
                else int(torch.randint(len(x), (1,), generator=generator)))
        centres.append(x[pick])
        d2 = torch.minimum(d2, (x - x[pick]).pow(2).sum(1))
    centres = torch.stack(centres).clone()
    for _ in range(iterations):
        assign = torch.cdist(x, centres).argmin(1)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
    counts = torch.bincount(torch.cdist(x, centres).argmin(1), minlength=k).to(x.dtype)
    return centres, counts


def rotation_trick(z_e: torch.Tensor, z_q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """sg(lambda R) z_e along the last dim (Fifty et al. 2024, eq. 4): with e = z_e/|z_e|,
    q = z_q/|z_q| and r = (e + q)/|e + q| held constant, R z = z - 2 r (r.z) + 2 q (e.z) and
    lambda = |z_q|/|z_e|. Its value is z_q."""
    norm_e = z_e.norm(dim=-1, keepdim=True).clamp(min=eps)
    norm_q = z_q.norm(dim=-1, keepdim=True).clamp(min=eps)
    e, q = (z_e / norm_e).detach(), (z_q / norm_q).detach()
    r = nn.functional.normalize(e + q, dim=-1, eps=eps).detach()
    rotated = z_e - 2 * r * (r * z_e).sum(-1, keepdim=True) + 2 * q * (e * z_e).sum(-1, keepdim=True)
    return (norm_q / norm_e).detach() * rotated


class Codebook(nn.Module):
    """K codes of dimension D with EMA (or codebook-loss) updates, k-means init and dead-code
    restarts; see the module docstring for the math. ``quantize(z_e)`` gives the code indices and
    the quantized vectors with the chosen gradient; the statistics of the current epoch
    (``epoch_stats``) are kept in buffers and reset by ``reset_epoch``."""

    def __init__(self, num_codes: int = 512, code_dim: int = 64, update: str = "ema", decay: float = 0.99,
                 eps: float = 1e-5, restart_threshold: float = 1.0, kmeans_init: bool = True,
                 kmeans_iterations: int = 10, seed: int = 0):
        super().__init__()
        if update not in UPDATES:
            raise ConfigError(f"codebook update {update!r} is unknown; choose one of {', '.join(UPDATES)}")
        if num_codes < 2 or code_dim < 1:
            raise ConfigError(f"a codebook needs num_codes >= 2 and code_dim >= 1, got {num_codes} and {code_dim}")
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"the codebook's EMA decay must lie in [0, 1), got {decay}")
        if restart_threshold < 0:
            raise ConfigError(f"restart_threshold must be >= 0 (0: no restarts), got {restart_threshold}")
        self.num_codes, self.code_dim, self.update, self.decay, self.eps = num_codes, code_dim, update, decay, eps
        self.restart_threshold, self.kmeans_init, self.kmeans_iterations = restart_threshold, kmeans_init, kmeans_iterations
        self.seed = seed
        embed = torch.randn(num_codes, code_dim) / math.sqrt(code_dim)
        if update == "loss":
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        self.register_buffer("ema_count", torch.ones(num_codes))
        self.register_buffer("ema_sum", embed.clone())
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self._ready = False  # a host copy of ``initialized`` once it is true (no read-back per step)
        self.register_buffer("steps", torch.tensor(0))
        # this epoch's statistics (all-reduced counts, restarts, commitment per data point, steps)
        self.register_buffer("epoch_counts", torch.zeros(num_codes))
        self.register_buffer("epoch_restarts", torch.tensor(0))
        self.register_buffer("epoch_commitment", torch.zeros(2))  # sum over steps, steps

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = False  # read ``initialized`` again at the next step

    # -- lookup ---------------------------------------------------------------------------------

    def nearest(self, z_e: torch.Tensor) -> torch.Tensor:
        """argmin_k ||z_e - e_k||^2 over the last dim of z_e (..., D) -> (...) long."""
        flat = z_e.reshape(-1, self.code_dim).float()
        e = self.embed.detach().float()
        d2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.T + e.pow(2).sum(1)[None]
        return d2.argmin(1).reshape(z_e.shape[:-1])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(codes.long(), self.embed)

    def quantize(self, z_e: torch.Tensor, gradient: str = "straight-through") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, z, z_q) for encoder outputs z_e (..., D): the nearest codes, the quantized vectors
        with the gradient of ``gradient`` towards z_e, and z_q itself (carrying the codebook's
        gradient in ``update="loss"``). In training with gradients on, the codebook is updated
        from (z_e, codes) when back-propagation reaches z_e."""
        codes = self.nearest(z_e)
        z_q = self.lookup(codes)
        if gradient == "rotation":
            z = rotation_trick(z_e, z_q)
        else:
            z = z_e + (z_q - z_e).detach()
        if self.training and torch.is_grad_enabled() and z_e.requires_grad:
            saved, assigned = z_e.detach().reshape(-1, self.code_dim).float(), codes.reshape(-1)
            z_e.register_hook(lambda grad: self._step(saved, assigned))
        return codes, z, z_q

    # -- updates --------------------------------------------------------------------------------

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.steps))

    @torch.no_grad()
    def init_kmeans(self, z: torch.Tensor) -> None:
        """Codes at the k-means centres of the rows z (every rank's, gathered)."""
        every = _all_gather_rows(z)
        centres, counts = kmeans(every, self.num_codes, self.kmeans_iterations, self._generator())
        self.embed.data.copy_(centres)
        self.ema_count.copy_(counts)
        self.ema_sum.copy_(centres * counts[:, None])
        self.initialized.fill_(True)
        self._ready = True

    @torch.no_grad()
    def ema_update(self, z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """One EMA step from encoder outputs z (n, D) and their codes (n,); returns the all-reduced
        counts n_k. With ``update="loss"`` only the counts N_k are tracked (for restarts)."""
        onehot = nn.functional.one_hot(codes, self.num_codes).to(z.dtype)
        counts, sums = onehot.sum(0), onehot.T @ z
        if _distributed():
            both = _all_reduce(torch.cat([counts[:, None], sums], 1))
            counts, sums = both[:, 0], both[:, 1:]
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.update == "ema":
            self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            total = self.ema_count.sum()
            smoothed = (self.ema_count + self.eps) / (total + self.num_codes * self.eps) * total
            self.embed.data.copy_(self.ema_sum / smoothed[:, None])
        return counts

    @torch.no_grad()
    def restart_dead(self, z: torch.Tensor) -> int:
        """Re-seed codes whose N_k is below the threshold at encoder outputs drawn at random from
        the rows z (every rank's, gathered); returns how many."""
        if self.restart_threshold <= 0:
            return 0
        dead = (self.ema_count < self.restart_threshold).nonzero().squeeze(1)
        if len(dead) == 0:  # the same on every rank: N_k is all-reduced
            return 0
        every = _all_gather_rows(z)
        pick = torch.randint(len(every), (len(dead),), generator=self._generator()).to(z.device)
        self.embed.data[dead] = every[pick].to(self.embed.dtype)
        self.ema_count[dead] = 2 * self.restart_threshold
        self.ema_sum[dead] = every[pick] * 2 * self.restart_threshold
        return len(dead)

    def _step(self, z: torch.Tensor, codes: torch.Tensor | None = None) -> None:
        """The codebook's part of a training step (called from the backward hook on z_e), from the
        rows z and the codes the forward pass assigned them (found again after a k-means start)."""
        with torch.no_grad():
            if not self._ready:  # read back from the device until it is true, then never again
                self._ready = bool(self.initialized)
            if not self._ready:
                self.init_kmeans(z)
                codes = None  # the codebook has just moved
            if codes is None:
                codes = self.nearest(z)
            counts = self.ema_update(z, codes)
            restarts = self.restart_dead(z)
            self.epoch_counts.add_(counts)
            self.epoch_restarts.add_(restarts)
            self.steps.add_(1)

    # -- epoch statistics -----------------------------------------------------------------------

    def add_commitment(self, per_point: torch.Tensor) -> None:
        with torch.no_grad():
            self.epoch_commitment.add_(torch.stack([per_point.detach().float().mean(), per_point.new_ones(()).float()]))

    def epoch_stats(self) -> dict:
        """Usage (fraction of codes chosen at least once this epoch), perplexity exp(H(p)) of the
        epoch's code frequencies p, restarts and the mean commitment ||z_e - sg(z_q)||^2 per data point."""
        counts = self.epoch_counts.double()
        commitment = _all_reduce(self.epoch_commitment.clone())
        p = counts / counts.sum().clamp(min=1)
        entropy = -(p * p.clamp(min=1e-30).log()).sum()
        return {"codebook_usage": float((counts > 0).double().mean()), "perplexity": float(entropy.exp()),
                "codebook_restarts": int(self.epoch_restarts),
                "commitment_loss": float(commitment[0] / commitment[1].clamp(min=1))}

    def reset_epoch(self) -> None:
        self.epoch_counts.zero_()
        self.epoch_restarts.zero_()
        self.epoch_commitment.zero_()


class GridEncoder(nn.Module):
    """Flat images (..., C*H*W) -> the conv stack of ``nets.ConvEncoder`` (two stride-2 4x4
    convolutions, 32 and 64 channels) -> 1x1 convolution to D: a grid (..., H/4, W/4, D)."""

    def __init__(self, image_shape, code_dim: int, act: str = "relu"):
        super().__init__()
        c, _, _ = _conv_grid(image_shape)
        c1, c2 = CONV_CHANNELS["conv"]
        self.image_shape = tuple(image_shape)
        self.conv = nn.Sequential(nn.Conv2d(c, c1, 4, 2, 1), activation(act), nn.Conv2d(c1, c2, 4, 2, 1),
                                  activation(act), nn.Conv2d(c2, code_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x.reshape(-1, *self.image_shape))
        return h.permute(0, 2, 3, 1).reshape(*x.shape[:-1], *h.shape[2:], h.shape[1])


class GridDecoder(nn.Module):
    """A grid (..., H/4, W/4, D) -> 3x3 convolution to 64 channels -> the transposed convolutions of
    ``nets.ConvDecoder`` -> ``params`` maps per image channel, flat channel-major, plus ``out_bias``."""

    def __init__(self, image_shape, code_dim: int, params: int = 1, act: str = "relu"):
        super().__init__()
        c, h, w = _conv_grid(image_shape)
        c1, c2 = CONV_CHANNELS["conv"]
        self.grid, self.code_dim = (h, w), code_dim
        self.deconv = nn.Sequential(nn.Conv2d(code_dim, c2, 3, 1, 1), activation(act),
                                    nn.ConvTranspose2d(c2, c1, 4, 2, 1), activation(act),
                                    nn.ConvTranspose2d(c1, params * c, 4, 2, 1), nn.Flatten())
        self.out_bias = nn.Parameter(torch.zeros(params * c * h * w * 16))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-3]
        h = z.reshape(-1, *self.grid, self.code_dim).permute(0, 3, 1, 2)
        return (self.deconv(h) + self.out_bias).reshape(*lead, -1)


class CodePointMass(TorchDistribution):
    """The VQ-VAE's guide: a point mass at the code indices ``codes`` (event of the last
    ``event_dim`` dims), log q = 0 there (-inf elsewhere). Deterministic, so ``rsample`` is
    the value itself and no score-function term arises."""

    has_rsample = True
    has_enumerate_support = True  # discrete: the toolkit's interpolation and traversals refuse it by name
    arg_constraints: dict = {}

    def __init__(self, codes: torch.Tensor, num_codes: int, event_dim: int = 2, validate_args=None):
        self.codes, self.num_codes = codes, num_codes
        shape = codes.shape
        super().__init__(shape[:len(shape) - event_dim], shape[len(shape) - event_dim:], validate_args=validate_args)

    @constraints.dependent_property
    def support(self):
        return constraints.independent(constraints.integer_interval(0, self.num_codes - 1), len(self.event_shape))

    def rsample(self, sample_shape=()):
        return self.codes.expand(torch.Size(sample_shape) + self.codes.shape) if sample_shape else self.codes

    def log_prob(self, value):
        same = (value == self.codes).reshape(*value.shape[:value.dim() - len(self.event_shape)], -1).all(-1)
        return torch.where(same, 0.0, -math.inf).to(torch.get_default_dtype())

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.event_shape
        codes = self.codes if self.codes.shape == shape else self.codes.expand(shape)  # keeps what rides on it
        return CodePointMass(codes, self.num_codes, len(self.event_shape))

    def enumerate_support(self, expand: bool = True):
        """The one value of positive probability."""
        return self.codes[None]

    @property
    def mean(self):
        return self.codes

    @property
    def mode(self):
        return self.codes


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"{name} {value!r} is unknown; choose one of {', '.join(choices)}")
    return value


@torch.no_grad()
def evaluate_vq(model, guide, x: torch.Tensor, prior=None, batch_size: int = 1000) -> dict:
    """The VQ-VAE's bound on the test rows x: with the guide's point mass at the nearest codes c(x),
    -log p(x) <= -log p(x | z_q(c)) - log p(c) (the ELBO, exact for a point-mass guide), with p(c)
    uniform (HW log K nats) and, given ``prior`` (a fitted ``pixelcnn``), the learned one; beside
    the reconstruction error (squared error of E[x|z_q] per data point) and the codebook usage
    and perplexity of the test codes. Nats per data point; bits per dimension where x is discrete."""
    codes, recon, sq = [], [], []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        c = guide.encode_codes(xb)
        d = model.decode_codes(c)
        codes.append(c)
        recon.append(-d.log_prob(xb))
        sq.append((d.mean - xb).pow(2).sum(-1))
    codes, recon = torch.cat(codes), torch.cat(recon)
    counts = torch.bincount(codes.flatten(), minlength=model.num_codes).double()
    p = counts / counts.sum()
    out = {"test_reconstruction_nll": float(recon.mean()), "test_squared_error": float(torch.cat(sq).mean()),
           "test_codebook_usage": float((counts > 0).double().mean()),
           "test_perplexity": float((-(p * p.clamp(min=1e-30).log()).sum()).exp()),
           "rate_uniform": model.rate, "test_nll_bound_uniform": float(recon.mean()) + model.rate,
           "codes_shape": list(codes.shape[1:]), "num_codes": model.num_codes}
    if prior is not None:
        rate = -prior.log_prob(codes)
        out["rate_pixelcnn"] = float(rate.mean())
        out["test_nll_bound_pixelcnn"] = float((recon + rate).mean())
    return out
