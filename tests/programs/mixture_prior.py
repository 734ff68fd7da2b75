"""A VAE with a mixture-of-Gaussians prior whose component c is enumerated in the model only
(Pyro's standard pattern for discrete latents the guide does not sample): train with ``enum``."""

import pyro
import pyro.distributions as dist
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self, x_dim=784, z_dim=10, components=5):
        super().__init__()
        self.z_dim = z_dim
        self.logits = nn.Parameter(torch.zeros(components))
        self.locs = nn.Parameter(torch.randn(components, z_dim))
        self.net = nn.Sequential(nn.Linear(z_dim, 200), nn.ReLU(), nn.Linear(200, x_dim))

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(logits=self.logits), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(self.locs[c], 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.net(z)).to_event(1), obs=x)


class Guide(nn.Module):
    def __init__(self, x_dim=784, z_dim=10):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(x_dim, 200), nn.ReLU(), nn.Linear(200, 2 * z_dim))

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.net(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))
