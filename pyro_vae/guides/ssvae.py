"""The guide of the semi-supervised M2 (Kingma et al. 2014): a classifier q(y|x) and q(z|x,y)."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae.errors import ConfigError
from pyro_vae.models.ssvae import NEEDS_LABELS, split_labelled
from pyro_vae.nets import MLP, GaussianHead
from pyro_vae.programs import BuiltinProgram
from pyro_vae.registry import GUIDES


@GUIDES.register("ssvae")
class SSVAEGuide(BuiltinProgram):
    """q(y|x) = Cat(classifier(x)) (enumerated where y is unknown), q(z|x,y) = N(encoder([x, y])),
    plus, in training mode only, the auxiliary classification loss alpha * -log q(y|x) on
    labelled rows (Kingma et al. 2014, eq. 9), ``aux_weight`` alpha. In eval mode the guide is
    q(y|x) q(z|x,y) alone, so test losses and importance weights are those of the model.
    ``classify(x)`` gives the predicted labels."""

    context_keys = ("y",)

    def __init__(self, x_dim: int = 784, z_dim: int = 50, hidden: Sequence[int] = (500,),
                 activation: str = "softplus", num_classes: int | None = 10, aux_weight: float = 46.0):
        super().__init__()
        if not num_classes:
            raise ConfigError(NEEDS_LABELS)
        self.num_classes, self.aux_weight = num_classes, aux_weight
        self.classifier = MLP([x_dim, *hidden, num_classes], activation)
        self.z_encoder = GaussianHead([x_dim + num_classes, *hidden, z_dim], activation)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x).argmax(-1)

    def _z(self, suffix, x, y):
        loc, scale = self.z_encoder.forward_with_label(x, y, self.num_classes)  # = z_encoder([x, onehot(y)])
        pyro.sample(f"z_{suffix}", dist.Normal(loc, scale, validate_args=False).to_event(1))

    def forward(self, x, y=None, **context):
        (x_l, y_l), x_u = split_labelled(x, y)
        if len(x_l):
            with pyro.plate("data_l", len(x_l)):
                self._z("l", x_l, y_l)
                if self.training:
                    # Pyro counts a guide factor f as part of log q, so f adds to the loss: here
                    # f = alpha * -log q(y|x), the auxiliary classification loss.
                    nll = nn.functional.cross_entropy(self.classifier(x_l), y_l.long(), reduction="none")
                    pyro.factor("y_aux", self.aux_weight * nll, has_rsample=True)
        if len(x_u):
            with pyro.plate("data_u", len(x_u)):
                y_u = pyro.sample("y_u", dist.Categorical(logits=self.classifier(x_u)),
                                  infer={"enumerate": "parallel"})
                self._z("u", x_u, y_u)
