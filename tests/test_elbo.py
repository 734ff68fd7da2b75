"""The project's sync-free ELBOs give Pyro's values and gradients."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_vae.guides import GaussianGuide
from pyro_vae.models import VAE
from pyro_vae.objectives import make_estimator


def _loss_and_grads(estimator, model, guide, x, seed=0):
    pyro.set_rng_seed(seed)
    loss = estimator.differentiable_loss(model, guide, x)
    params = list(model.parameters()) + list(guide.parameters())
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("name, pyro_cls", [("elbo", Trace_ELBO), ("meanfield", TraceMeanField_ELBO)])
@pytest.mark.parametrize("k", [1, 3])
def test_same_loss_and_gradients_as_pyro(name, pyro_cls, k):
    torch.manual_seed(0)
    model, guide = VAE(x_dim=12, z_dim=3, hidden=[8]), GaussianGuide(x_dim=12, z_dim=3, hidden=[8])
    x = torch.bernoulli(torch.rand(5, 12))
    ours = _loss_and_grads(make_estimator(name, particles=k), model, guide, x)
    theirs = _loss_and_grads(pyro_cls(num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1),
                             model, guide, x)
    assert torch.allclose(ours[0], theirs[0], rtol=1e-5)
    for a, b in zip(ours[1], theirs[1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_score_function_terms_for_a_discrete_guide_site():
    """A non-reparameterizable site gets Pyro's score-function surrogate, term for term."""
    logits = torch.zeros(3, requires_grad=True)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(logits=torch.zeros(3)))
            pyro.sample("x", dist.Normal(c.float(), 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Categorical(logits=logits))

    x = torch.tensor([0.0, 2.0, 1.0])
    for cls, name in ((Trace_ELBO, "elbo"),):
        pyro.set_rng_seed(3)
        a = make_estimator(name).differentiable_loss(model, guide, x)
        ga = torch.autograd.grad(a, [logits])[0]
        pyro.set_rng_seed(3)
        b = cls(max_plate_nesting=1).differentiable_loss(model, guide, x)
        gb = torch.autograd.grad(b, [logits])[0]
        assert torch.allclose(a, b) and torch.allclose(ga, gb)
