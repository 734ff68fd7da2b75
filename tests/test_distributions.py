import pyro.distributions as dist
import torch
from torch.distributions import kl_divergence

from pyro_vae.distributions import ReparamNormal, StandardNormal


def _grads(f, *params):
    return torch.autograd.grad(f, params, retain_graph=True)


def test_reparam_normal_log_prob_of_own_sample_matches_normal_in_value_and_gradient():
    loc = torch.randn(5, 3, requires_grad=True)
    scale = (torch.rand(5, 3) + 0.2).requires_grad_()
    fast = ReparamNormal(loc, scale).expand((4, 5, 3))
    torch.manual_seed(0)
    z = fast.rsample()
    lp_fast = fast.log_prob(z)
    lp_ref = dist.Normal(loc, scale).log_prob(z)
    assert torch.allclose(lp_fast, lp_ref, atol=1e-5)
    g_fast = _grads((lp_fast * z).sum(), loc, scale)
    g_ref = _grads((lp_ref * z).sum(), loc, scale)
    for a, b in zip(g_fast, g_ref):
        assert torch.allclose(a, b, atol=1e-4)


def test_reparam_normal_other_values_take_the_textbook_form():
    d = ReparamNormal(torch.zeros(3), torch.ones(3))
    d.rsample()
    v = torch.tensor([0.5, -1.0, 2.0])
    assert torch.allclose(d.log_prob(v), dist.Normal(0.0, 1.0).log_prob(v))


def test_standard_normal_log_prob_and_kl():
    z = torch.randn(7, 4)
    assert torch.allclose(StandardNormal((7, 4)).log_prob(z), dist.Normal(0.0, 1.0).log_prob(z))
    q = dist.Normal(torch.randn(7, 4), torch.rand(7, 4) + 0.1)
    assert torch.allclose(kl_divergence(q, StandardNormal((7, 4))),
                          kl_divergence(q, dist.Normal(torch.zeros(7, 4), 1.0)), atol=1e-6)
