"""The VQ-VAE's deterministic guide: a point mass at the nearest codes."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import torch

from pyro_vae.checks import check_features
from pyro_vae.errors import ConfigError
from pyro_vae.models.vqvae import STRAIGHT_THROUGH, VQVAE
from pyro_vae.programs import BuiltinProgram
from pyro_vae.registry import GUIDES
from pyro_vae.vq import GRADIENTS, CodePointMass, GridEncoder, check_choice


@GUIDES.register("vqvae")
class VQGuide(BuiltinProgram):
    """q(c|x) = delta(c - argmin_k ||z_e(x) - e_k||) per grid position, z_e(x) a conv encoder's
    grid of D-dim vectors (van den Oord et al. 2017). The decoder receives z_q with the gradient of
    ``gradient`` ("straight-through", or "rotation", Fifty et al. 2024). In training the guide adds
    the commitment loss ``commitment`` * ||z_e - sg(z_q)||^2 (beta = 0.25 in the paper; and with the
    model's ``update="loss"`` the codebook loss ||sg(z_e) - z_q||^2) as a ``pyro.factor``, which
    Pyro counts in log q, so it adds to the loss of ``elbo`` and ``meanfield``; test losses and
    ``eval`` see the bound alone. The importance-weighted estimators are refused: with a point-mass
    guide every particle is the same, so their bounds equal the ELBO at K times the cost."""

    latent_sites = ("codes",)
    not_traceable = "its codebook updates in a backward hook, which a traced replay would skip"

    def __init__(self, model, x_dim: int = 784, image_shape: Sequence[int] | None = None,
                 activation: str = "relu", commitment: float = 0.25, gradient: str = "straight-through"):
        super().__init__()
        inner = getattr(model, "program", model)
        if not isinstance(inner, VQVAE):
            raise ConfigError(f"guide 'vqvae' needs model 'vqvae' (it quantizes with that model's codebook), "
                              f"got {type(inner).__name__}: use --model vqvae --guide vqvae")
        if commitment < 0:
            raise ConfigError(f"commitment must be >= 0, got {commitment}")
        self.__dict__["vq_model"] = inner  # not a submodule: the codebook is saved once, with the model
        self.x_dim, self.commitment = x_dim, commitment
        self.gradient = check_choice("gradient", gradient, GRADIENTS)
        self.encoder = GridEncoder(inner.image_shape, inner.codebook.code_dim, activation)

    @property
    def codebook(self):
        return self.vq_model.codebook

    def check_estimator(self, estimator) -> None:
        """Refuse estimators other than ``elbo`` and ``meanfield``, by name."""
        from pyro_vae.objectives.elbo import MeanFieldELBO, TraceELBO

        if type(estimator) not in (TraceELBO, MeanFieldELBO):
            name = getattr(estimator, "name", type(estimator).__name__)
            raise ConfigError(f"the VQ-VAE trains with --estimator elbo or meanfield, not {name}: its guide is a "
                              f"point mass, so every importance sample is the same and an importance-weighted "
                              f"bound equals the ELBO")

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The code indices (rows, H, W) of the rows of x."""
        return self.codebook.nearest(self.encoder(x))

    def forward(self, x: torch.Tensor, **context):
        check_features(x, self.x_dim, type(self).__name__)
        with pyro.plate("data", x.shape[0]):
            z_e = self.encoder(x)
            codes, z, z_q = self.codebook.quantize(z_e, self.gradient)
            setattr(codes, STRAIGHT_THROUGH, z)
            pyro.sample("codes", CodePointMass(codes, self.codebook.num_codes, event_dim=2))
            if self.training:
                commit = (z_e - z_q.detach()).pow(2).sum((-3, -2, -1))
                loss = self.commitment * commit
                if self.codebook.update == "loss":
                    loss = loss + (z_e.detach() - z_q).pow(2).sum((-3, -2, -1))
                if torch.is_grad_enabled() and z_e.requires_grad:
                    self.codebook.add_commitment(commit)
                pyro.factor("vq_loss", loss, has_rsample=True)
        return codes
