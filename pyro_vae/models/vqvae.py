"""The VQ-VAE as a Pyro program (van den Oord et al. 2017, "Neural discrete representation learning")."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch

from pyro_vae.checks import check_features
from pyro_vae.likelihoods import make_likelihood
from pyro_vae.programs import BuiltinProgram
from pyro_vae.registry import MODELS
from pyro_vae.vq import Codebook, GridDecoder, _conv_grid

STRAIGHT_THROUGH = "_pyro_vae_straight_through"  # the guide's z, with its gradient, on the codes tensor


@MODELS.register("vqvae")
class VQVAE(BuiltinProgram):
    """p(c) p(x | z_q(c)): code indices c, a grid (H/4, W/4) of categorical latents with the uniform
    prior p(c) = K^-(HW) (so KL(q || p) = HW log K, a constant, as van den Oord et al. 2017),
    z_q(c) = e_c from the codebook, and the project's likelihood on a conv decoder of z_q.

    The codebook (``pyro_vae.vq.Codebook``: ``num_codes`` K of ``code_dim`` D, ``update`` "ema" with
    ``decay`` or "loss", k-means init, dead-code restarts below ``restart_threshold``) lives here and
    is updated by the guide ``vqvae``. When the guide's codes are replayed, the decoder sees the
    guide's quantized vectors, whose gradient reaches the encoder (straight-through or rotation)."""

    latent_sites = ("codes",)

    def __init__(self, x_dim: int = 784, image_shape: Sequence[int] | None = None, activation: str = "relu",
                 likelihood: str = "bernoulli", train_mean: torch.Tensor | None = None, num_codes: int = 512,
                 code_dim: int = 64, update: str = "ema", decay: float = 0.99, restart_threshold: float = 1.0,
                 kmeans_init: bool = True, seed: int = 0):
        super().__init__()
        image_shape = tuple(image_shape) if image_shape else ((1, 28, 28) if x_dim == 784 else None)
        _, h, w = _conv_grid(image_shape)
        self.x_dim, self.image_shape, self.grid = x_dim, image_shape, (h, w)
        self.codebook = Codebook(num_codes, code_dim, update, decay, restart_threshold=restart_threshold,
                                 kmeans_init=kmeans_init, seed=seed)
        self.likelihood = make_likelihood(likelihood, x_dim)
        self.decoder = GridDecoder(image_shape, code_dim, self.likelihood.out_features() // x_dim, activation)
        if train_mean is not None:
            self.likelihood.init_bias(self.decoder.out_bias, train_mean)

    @property
    def num_codes(self) -> int:
        return self.codebook.num_codes

    @property
    def rate(self) -> float:
        """KL(q || p) = -log p(c) = HW log K nats per data point under the uniform prior."""
        return math.prod(self.grid) * math.log(self.num_codes)

    def prior(self, batch_shape=()) -> dist.Distribution:
        logits = self.codebook.ema_count.new_zeros(self.num_codes)
        return dist.Categorical(logits=logits).expand(tuple(batch_shape) + self.grid).to_event(2)

    def decode_codes(self, codes: torch.Tensor) -> dist.Distribution:
        """p(x | z_q(codes)) for code grids (..., H, W); the guide's straight-through z where it
        rides on ``codes``."""
        z = getattr(codes, STRAIGHT_THROUGH, None)
        if z is None or z.shape[:-1] != codes.shape:
            z = self.codebook.lookup(codes)
        return self.likelihood(self.decoder(z))

    def forward(self, x: torch.Tensor, **context):
        check_features(x, self.x_dim, type(self).__name__)
        with pyro.plate("data", x.shape[0]):
            codes = pyro.sample("codes", self.prior((x.shape[0],)))
            return pyro.sample("x", self.decode_codes(codes), obs=x)

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True) -> torch.Tensor:
        """n draws through the uniform prior over codes (a learned prior does far better:
        ``pyro-vae prior RUN --kind pixelcnn``)."""
        d = self.decode_codes(self.prior((n,)).sample())
        return d.mean if mean else d.sample()

    def epoch_metrics(self, row: dict) -> dict:
        """Per-epoch codebook statistics for metrics.jsonl (read and reset once per epoch):
        usage, perplexity, restarts, the commitment loss and the test reconstruction
        -log p(x|z_q) = test_loss - HW log K."""
        stats = self.codebook.epoch_stats()
        self.codebook.reset_epoch()
        if "test_loss" in row:
            stats["reconstruction_loss"] = row["test_loss"] - self.rate
        return stats
