"""Amortized guides q(z|x), one family per file, found by name in ``GUIDES``."""

from pyro_vae.guides.conditional import ConditionalGaussianGuide
from pyro_vae.guides.exact import LinearPosteriorGuide
from pyro_vae.guides.flows import IAFGuide, LowRankGuide
from pyro_vae.guides.gaussian import GaussianGuide
from pyro_vae.guides.hierarchical import HierarchicalGuide
from pyro_vae.guides.ssvae import SSVAEGuide
from pyro_vae.guides.vqvae import VQGuide
from pyro_vae.registry import GUIDES

__all__ = ["VQGuide", "ConditionalGaussianGuide", "GUIDES", "GaussianGuide", "HierarchicalGuide", "IAFGuide",
           "LinearPosteriorGuide", "LowRankGuide", "SSVAEGuide"]
