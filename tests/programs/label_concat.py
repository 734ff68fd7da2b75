"""A label-conditioned VAE whose networks concatenate z with one_hot(y): written for one particle
(``torch.cat`` does not broadcast over an extra particle dimension). ``forward(x, y)``."""

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn


class Model(nn.Module):
    def __init__(self, x_dim=784, z_dim=10, num_classes=10):
        super().__init__()
        self.z_dim, self.num_classes = z_dim, num_classes
        self.net = nn.Sequential(nn.Linear(z_dim + num_classes, 200), nn.ReLU(), nn.Linear(200, x_dim))

    def forward(self, x, y):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.z_dim), 1.0).to_event(1))
            logits = self.net(torch.cat([z, F.one_hot(y, self.num_classes).to(z.dtype)], -1))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


class Guide(nn.Module):
    def __init__(self, x_dim=784, z_dim=10, num_classes=10):
        super().__init__()
        self.num_classes = num_classes
        self.net = nn.Sequential(nn.Linear(x_dim + num_classes, 200), nn.ReLU(), nn.Linear(200, 2 * z_dim))

    def forward(self, x, y):
        with pyro.plate("data", x.shape[0]):
            h = self.net(torch.cat([x, F.one_hot(y, self.num_classes).to(x.dtype)], -1))
            loc, log_scale = h.chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))
