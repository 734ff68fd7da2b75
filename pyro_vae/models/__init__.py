"""Generative models p(x|z) p(z), one family per file, found by name in ``MODELS``."""

from pyro_vae.models.cvae import CVAE, QuadrantCVAE
from pyro_vae.models.hierarchical import HierarchicalVAE
from pyro_vae.models.priors import MixturePriorVAE, VampPriorVAE
from pyro_vae.models.ssvae import SSVAE
from pyro_vae.models.vae import VAE, LatentVariableModel, LinearGaussian
from pyro_vae.models.vqvae import VQVAE
from pyro_vae.registry import MODELS

__all__ = ["VQVAE", "CVAE", "HierarchicalVAE", "LatentVariableModel", "LinearGaussian", "MODELS", "MixturePriorVAE",
           "QuadrantCVAE", "SSVAE", "VAE", "VampPriorVAE"]
