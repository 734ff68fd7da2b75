"""A VAE written as two plain functions, its networks created at import and registered with
``pyro.module``, plus a learned observation noise kept by ``pyro.param`` with a constraint: the
style of Pyro's tutorials. Real-valued data, Gaussian likelihood."""

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints

X_DIM, Z_DIM, HIDDEN = 2, 2, 32
decoder = nn.Sequential(nn.Linear(Z_DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, X_DIM))
encoder = nn.Sequential(nn.Linear(X_DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 2 * Z_DIM))


def model(x):
    pyro.module("decoder", decoder)
    noise = pyro.param("noise", torch.tensor(0.5), constraint=constraints.positive)
    with pyro.plate("points", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], Z_DIM), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(decoder(z), noise).to_event(1), obs=x)


def guide(x):
    pyro.module("encoder", encoder)
    with pyro.plate("points", x.shape[0]):
        loc, log_scale = encoder(x).chunk(2, -1)
        pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))
