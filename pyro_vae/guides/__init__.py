"""Amortized guides q(z|x), one family per file, found by name in ``GUIDES``."""

from pyro_vae.guides.gaussian import GaussianGuide
from pyro_vae.guides.hierarchical import HierarchicalGuide
from pyro_vae.registry import GUIDES

__all__ = ["HierarchicalGuide", "GUIDES", "GaussianGuide"]
