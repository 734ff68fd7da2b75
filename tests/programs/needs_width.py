"""A model whose constructor needs an argument that pyro-vae does not supply."""

from torch import nn


class Model(nn.Module):
    def __init__(self, x_dim, width):
        super().__init__()
        self.net = nn.Linear(x_dim, width)

    def forward(self, x):
        raise AssertionError("never called: construction fails first")
