"""The exact posterior of the linear-Gaussian model as a guide: a yardstick for estimators.

With q(z|x) = p(z|x) every importance weight equals p(x), so log-likelihood estimates are exact
for any k, the ELBO equals log p(x), and path-derivative gradients of the guide vanish.
"""

from __future__ import annotations

import pyro

from pyro_vae.programs import BuiltinProgram
from pyro_vae.registry import GUIDES


@GUIDES.register("linear-posterior")
class LinearPosteriorGuide(BuiltinProgram):
    """q(z|x) = p(z|x) of a ``LinearGaussian`` model (shares its parameters; learns nothing)."""

    latent_sites = ("z",)

    def __init__(self, model):
        super().__init__()
        self._model = [model]  # a list: do not register the model's parameters twice

    @property
    def model(self):
        return self._model[0]

    def posterior(self, x):
        return self.model.posterior(x)

    def forward(self, x, **context):
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", self.posterior(x))
