"""A Bernoulli observation model written for binary data, pointed at real-valued 2-D points."""

import pyro
import pyro.distributions as dist
from torch import nn

decoder = nn.Linear(2, 2)


def model(x):
    pyro.module("decoder", decoder)
    with pyro.plate("points", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)
