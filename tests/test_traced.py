"""--jit: a traced objective takes the same steps as the eager one, for every traceable estimator."""

import copy

import pytest
import torch

from pyro_vae.guides import GaussianGuide
from pyro_vae.models import VAE
from pyro_vae.objectives import Objective, make_estimator
from pyro_vae.objectives.traced import TracedObjective

TRACEABLE = ["elbo", "meanfield", "elbo:K=3", "iwae:K=4", "stl:K=4", "dreg:K=4", "miwae:M=2,K=2",
             "ciwae:beta=0.5,K=4", "piwae:M=2,K=2", "renyi:alpha=0.5,K=4"]


def _two_steps(objective, x, beta):
    opt = torch.optim.Adam(objective.parameters(), lr=1e-2)
    torch.manual_seed(1)
    for _ in range(2):  # the second step replays the trace made in the first
        loss = objective(x, beta=beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.detach(), [p.detach().clone() for p in objective.parameters()]


@pytest.mark.parametrize("spec", TRACEABLE)
def test_traced_steps_equal_eager_steps(spec):
    torch.manual_seed(0)
    eager = Objective(VAE(x_dim=12, z_dim=3, hidden=[8]), GaussianGuide(x_dim=12, z_dim=3, hidden=[8]),
                      make_estimator(spec))
    traced = TracedObjective(copy.deepcopy(eager))
    x = torch.bernoulli(torch.rand(6, 12))
    loss_e, params_e = _two_steps(eager, x, 0.7)
    loss_t, params_t = _two_steps(traced, x, 0.7)
    assert torch.allclose(loss_e, loss_t, rtol=1e-5)
    for a, b in zip(params_e, params_t):
        assert torch.allclose(a, b, atol=1e-6)
