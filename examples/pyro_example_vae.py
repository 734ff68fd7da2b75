"""Pyro's VAE example (examples/vae/vae.py in Pyro's repository), typed the way Pyro users write
it: one module with ``model`` and ``guide`` methods, ``pyro.module`` registration, sites named
"latent" and "obs", a constructor taking ``z_dim`` and ``hidden_dim``. Nothing in it knows about
pyro-vae; ``examples/pyro_example_compare.py`` trains it by import path."""

import pyro
import pyro.distributions as dist
import torch
from torch import nn


class Encoder(nn.Module):
    def __init__(self, z_dim, hidden_dim, x_dim=784):
        super().__init__()
        self.x_dim = x_dim
        self.fc1 = nn.Linear(x_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)
        self.softplus = nn.Softplus()

    def forward(self, x):
        hidden = self.softplus(self.fc1(x.reshape(-1, self.x_dim)))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class Decoder(nn.Module):
    def __init__(self, z_dim, hidden_dim, x_dim=784):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, x_dim)
        self.softplus = nn.Softplus()

    def forward(self, z):
        return torch.sigmoid(self.fc21(self.softplus(self.fc1(z))))


class VAE(nn.Module):
    def __init__(self, z_dim=50, hidden_dim=400, use_cuda=False):
        super().__init__()
        self.encoder = Encoder(z_dim, hidden_dim)
        self.decoder = Decoder(z_dim, hidden_dim)
        self.z_dim = z_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = torch.zeros(x.shape[0], self.z_dim, dtype=x.dtype, device=x.device)
            z_scale = torch.ones(x.shape[0], self.z_dim, dtype=x.dtype, device=x.device)
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1),
                        obs=x.reshape(-1, 784))
            return loc_img

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
