"""A deterministic guide for the distributed tests: with no sampling noise, a run's parameters
depend only on the data order, so a 2-process run can be compared with a 1-process run."""

import pyro
import pyro.distributions as dist
from torch import nn

from pyro_vae.nets import MLP


class DeltaGuide(nn.Module):
    """q(z|x) = delta(encoder(x)): an autoencoder's guide (MAP inference of z)."""

    latent_sites = ("z",)

    def __init__(self, x_dim, z_dim, hidden, activation, **_):
        super().__init__()
        self.encoder = MLP([x_dim, *hidden, z_dim], activation)

    def forward(self, x, **context):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(self.encoder(x)).to_event(1))
