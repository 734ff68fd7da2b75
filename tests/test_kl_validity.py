"""The closed-form KL is used only where it is valid (objectives/kl.py), in every place that
uses it: ``meanfield``, free bits and capacity, the eval's KL split and compare's KL."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_vae.compare import kl_by_site, kl_estimate
from pyro_vae.evaluation import evaluate
from pyro_vae.guides import GaussianGuide
from pyro_vae.models import VAE
from pyro_vae.objectives import KLPenaltyObjective, make_estimator
from pyro_vae.objectives.base import traces
from pyro_vae.objectives.kl import kl_methods
from pyro_vae.objectives.kl_penalty import KLNotAvailableError, kl_terms

# ----------------------------------------------------------------------------------------------
# (1) a Bernoulli latent: its score-function term is kept

X_BERN = torch.tensor([0.5, 1.5])


def _bernoulli_pair(logit):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(2 * z - 1, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=logit.expand(x.shape[0])))

    return model, guide


def _exact_bernoulli_elbo(logit):
    """sum_x sum_z q(z) [log p(x|z) + log p(z) - log q(z)], enumerated by hand."""
    q1 = torch.sigmoid(logit)
    elbo = 0.0
    for xi in X_BERN:
        for z, qz in ((1.0, q1), (0.0, 1 - q1)):
            elbo = elbo + qz * (dist.Normal(2 * z - 1, 1.0).log_prob(xi) + math.log(0.5) - qz.log())
    return elbo


def test_meanfield_keeps_the_score_function_term_of_a_bernoulli_latent():
    logit = torch.tensor(0.3, requires_grad=True)
    exact_grad = torch.autograd.grad(_exact_bernoulli_elbo(logit), logit)[0]
    assert float(exact_grad) == pytest.approx(0.8312, abs=1e-4)
    model, guide = _bernoulli_pair(logit)
    pyro.set_rng_seed(0)
    loss = make_estimator("meanfield", particles=20000).differentiable_loss(model, guide, X_BERN)
    grad = -torch.autograd.grad(loss, logit)[0]
    # was -0.147: the KL's gradient alone, sign flipped, 118% off; now within Monte Carlo noise
    assert float(grad) == pytest.approx(float(exact_grad), rel=0.05)
    assert float(-loss) == pytest.approx(float(_exact_bernoulli_elbo(logit)), abs=0.05)
    methods = make_estimator("meanfield").kl_methods(model, guide, X_BERN)
    assert methods["z"].startswith("monte carlo ('z' is not reparameterized")


def test_meanfield_equals_elbo_term_for_term_with_a_discrete_site():
    """With a score-function site the trace is estimated exactly as ``elbo`` does."""
    logit = torch.tensor(-0.4, requires_grad=True)
    model, guide = _bernoulli_pair(logit)
    out = []
    for name in ("elbo", "meanfield"):
        pyro.set_rng_seed(7)
        loss = make_estimator(name, particles=5).differentiable_loss(model, guide, X_BERN)
        out.append((loss, torch.autograd.grad(loss, logit)[0]))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_free_bits_and_capacity_refuse_a_bernoulli_latent():
    logit = torch.tensor(0.3, requires_grad=True)
    model, guide = _bernoulli_pair(logit)

    class Wrap(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, *a, **k):
            return self.fn(*a, **k)

    objective = KLPenaltyObjective(Wrap(model), Wrap(guide), make_estimator("meanfield"))
    with pytest.raises(KLNotAvailableError, match="'z' .*has no rsample"):
        objective(X_BERN, capacity=1.0)


# ----------------------------------------------------------------------------------------------
# (2) dependent layers drawn in the other order by the guide


def _layers(x):
    """x: (points, 1); the issue's two layers, z2 ~ N(0, 1), z1 ~ N(z2, 0.1)."""
    with pyro.plate("data", x.shape[0]):
        z2 = pyro.sample("z2", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
        z1 = pyro.sample("z1", dist.Normal(z2, 0.1).to_event(1))
        pyro.sample("x", dist.Normal(z1, 1.0).to_event(1), obs=x)


def _bottom_up_guide(x):
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Normal(x, 1.0).to_event(1))
        pyro.sample("z2", dist.Normal(0.5 * z1, 1.0).to_event(1))


def _exact_layers_elbo(x):
    """The ELBO of this Gaussian pair in closed form, per data point.

    q: z1 ~ N(x, 1), z2 | z1 ~ N(z1/2, 1); p: z2 ~ N(0, 1), z1 | z2 ~ N(z2, 0.01), x | z1 ~ N(z1, 1).
    E_q z1 = x, Var z1 = 1; E(z1 - z2)^2 = E(z1/2 - e)^2 = (x^2 + 1)/4 + 1; E z2^2 = x^2/4 + 1/4 + 1.
    """
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    log_px = -half_log_2pi - 0.5 * 1.0  # E (x - z1)^2 = 1
    log_pz1 = -half_log_2pi - math.log(0.1) - 0.5 * ((x**2 + 1) / 4 + 1) / 0.01
    log_pz2 = -half_log_2pi - 0.5 * (x**2 / 4 + 1.25)
    entropy = 2 * (half_log_2pi + 0.5)  # two unit-variance Gaussians
    return log_px + log_pz1 + log_pz2 + entropy


def test_meanfield_on_dependent_layers_drawn_bottom_up_is_the_elbo():
    torch.manual_seed(0)
    x = torch.randn(100, 1)
    exact = float(_exact_layers_elbo(x).mean())
    out = {}
    for name in ("elbo", "meanfield"):
        pyro.set_rng_seed(0)
        out[name] = -float(make_estimator(name, particles=2000).differentiable_loss(_layers, _bottom_up_guide, x)) / 100
    # meanfield was ~50 nats per point below the ELBO here (the issue measured 99.9 nats on its
    # program). Both are now the ELBO up to Monte Carlo noise (sd ~0.25: (z1 - z2)^2 / 0.02);
    # on the same draws they differ only by z2's closed form against its sampled term
    assert out["elbo"] == pytest.approx(exact, abs=1.0)
    assert out["meanfield"] == pytest.approx(exact, abs=1.0)
    assert out["meanfield"] == pytest.approx(out["elbo"], abs=0.05)
    methods = make_estimator("meanfield").kl_methods(_layers, _bottom_up_guide, x)
    assert methods == {"z1": "monte carlo (its prior may depend on 'z2', which the guide draws after it)",
                       "z2": "closed form"}


def test_meanfield_uses_the_closed_form_when_the_guide_draws_top_down():
    def top_down(x):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(0.5 * x, 1.0).to_event(1))
            pyro.sample("z1", dist.Normal(z2, 1.0).to_event(1))

    x = torch.randn(10, 1)
    methods = make_estimator("meanfield").kl_methods(_layers, top_down, x)
    assert methods == {"z2": "closed form", "z1": "closed form"}


def test_the_same_rule_in_free_bits_eval_and_compare():
    torch.manual_seed(0)
    x = torch.randn(50, 1)

    class Fn(torch.nn.Module):  # the Objective wants modules
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, *a, **k):
            return self.fn(*a, **k)

    # KL(q(z1, z2 | x) || p(z1, z2)) = -(ELBO - E log p(x|z1)), E log p(x|z1) = -log(2 pi)/2 - 1/2
    exact_kl = float((-_exact_layers_elbo(x)).mean()) - 0.5 * math.log(2 * math.pi) - 0.5
    pyro.set_rng_seed(1)
    by_site = kl_by_site(Fn(_layers), Fn(_bottom_up_guide), x, particles=2000)
    assert by_site["z2"][1] == "closed form" and by_site["z1"][1].startswith("monte carlo (its prior")
    assert sum(v for v, _ in by_site.values()) == pytest.approx(exact_kl, abs=1.0)
    pyro.set_rng_seed(1)
    assert kl_estimate(Fn(_layers), Fn(_bottom_up_guide), x, particles=2000) == pytest.approx(exact_kl, abs=1.0)

    r = evaluate(Fn(_layers), Fn(_bottom_up_guide), x, k=2000, psis=False)
    assert r["kl_method"] == {"z1": "monte carlo (its prior may depend on 'z2', which the guide draws after it)",
                              "z2": "closed form"}
    assert r["rate"] == pytest.approx(exact_kl, abs=1.0)

    pyro.set_rng_seed(1)
    kl = kl_terms(*traces(_layers, _bottom_up_guide, x, 2000), per_dimension=False)
    assert kl.shape == (2000, 50, 2)
    assert float(kl.sum(-1).mean()) == pytest.approx(exact_kl, abs=1.0)


# ----------------------------------------------------------------------------------------------
# masks


@pytest.mark.parametrize("mask", [True, False])
def test_meanfield_with_a_latent_masked_by_a_constant(mask):
    """Pyro's test_mean_field_mask_ok: ``.mask(False)`` used to crash with "'float' object has no
    attribute 'sum'"; a masked site contributes nothing, so the loss is -log p(y|z) alone."""
    loc = torch.tensor(0.3, requires_grad=True)

    def model(y):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).mask(mask))
        pyro.sample("y", dist.Normal(z, 1.0), obs=y)

    def guide(y):
        pyro.sample("z", dist.Normal(loc, 1.0).mask(mask))

    y = torch.tensor(1.0)
    pyro.set_rng_seed(0)
    loss = make_estimator("meanfield").differentiable_loss(model, guide, y)
    pyro.set_rng_seed(0)
    z = float(dist.Normal(loc, 1.0).rsample())
    expected = -float(dist.Normal(z, 1.0).log_prob(y)) + (0.5 * 0.3**2 if mask else 0.0)
    assert float(loss) == pytest.approx(expected, abs=1e-5)
    grad = torch.autograd.grad(loss, loc)[0]
    assert torch.isfinite(grad)


def test_poutine_mask_false_and_differing_masks():
    def model(x):
        with pyro.plate("data", x.shape[0]), poutine.mask(mask=False):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data2", x.shape[0]):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def masked_guide(x):
        with pyro.plate("data", x.shape[0]), poutine.mask(mask=False):
            pyro.sample("z", dist.Normal(x, 1.0))

    def unmasked_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x, 1.0))

    x = torch.randn(20)
    est = make_estimator("meanfield")
    assert est.kl_methods(model, masked_guide, x) == {"z": "closed form"}
    assert est.kl_methods(model, unmasked_guide, x) == {"z": "monte carlo (model and guide mask it differently)"}
    for guide in (masked_guide, unmasked_guide):  # equal to elbo on the same draws
        values = []
        for name in ("elbo", "meanfield"):
            pyro.set_rng_seed(0)
            values.append(float(make_estimator(name).differentiable_loss(model, guide, x)))
        assert values[0] == pytest.approx(values[1], rel=1e-6)


# ----------------------------------------------------------------------------------------------
# the built-ins: closed form, as before


def test_builtin_vae_gets_the_closed_form_everywhere():
    torch.manual_seed(0)
    model, guide = VAE(x_dim=12, z_dim=3, hidden=[8]), GaussianGuide(x_dim=12, z_dim=3, hidden=[8])
    x = torch.bernoulli(torch.rand(5, 12))
    assert make_estimator("meanfield").kl_methods(model, guide, x) == {"z": "closed form"}
    assert kl_methods(*traces(model, guide, x, 3)) == {"z": "closed form"}
    assert kl_by_site(model, guide, x)["z"][1] == "closed form"


def test_a_kl_weight_given_as_a_tensor_keeps_the_expectation():
    """Under --jit beta is a tensor, so model and guide scales are distinct objects: the closed
    form then carries the Monte Carlo term (s_q - s_p) log p(z), zero when they are equal, and
    the expectation s_p E log p - s_q E log q when they differ."""
    from pyro_vae.objectives.base import scale_latents

    torch.manual_seed(0)
    model, guide = VAE(x_dim=12, z_dim=3, hidden=[8]), GaussianGuide(x_dim=12, z_dim=3, hidden=[8])
    x = torch.bernoulli(torch.rand(5, 12))
    est = make_estimator("meanfield")
    pyro.set_rng_seed(0)
    a = est.differentiable_loss(scale_latents(model, 0.5), scale_latents(guide, 0.5), x)
    pyro.set_rng_seed(0)
    beta = torch.tensor(0.5)
    b = est.differentiable_loss(scale_latents(model, beta), scale_latents(guide, beta), x)
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    losses = {}
    for name in ("elbo", "meanfield"):  # model and guide scaled differently: same expectation
        pyro.set_rng_seed(0)
        losses[name] = float(make_estimator(name, particles=20000).differentiable_loss(
            scale_latents(model, torch.tensor(0.5)), scale_latents(guide, torch.tensor(0.8)), x))
    assert losses["meanfield"] == pytest.approx(losses["elbo"], abs=0.05)


def test_meanfield_gradient_on_dependent_layers_is_the_exact_gradient():
    """q: z1 ~ N(a x, 1), z2 | z1 ~ N(b z1, 1); the ELBO in closed form, differentiated."""
    a = torch.tensor(0.8, requires_grad=True)
    b = torch.tensor(0.4, requires_grad=True)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(a * x, 1.0).to_event(1))
            pyro.sample("z2", dist.Normal(b * z1, 1.0).to_event(1))

    torch.manual_seed(0)
    x = torch.randn(100, 1)
    m2 = a**2 * x**2 + 1  # E z1^2
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    exact = (-half_log_2pi - 0.5 * ((x - a * x) ** 2 + 1)
             - half_log_2pi - math.log(0.1) - 0.5 * ((1 - b) ** 2 * m2 + 1) / 0.01
             - half_log_2pi - 0.5 * (b**2 * m2 + 1)
             + 2 * (half_log_2pi + 0.5)).sum()
    exact_grad = torch.stack(torch.autograd.grad(exact, (a, b)))
    pyro.set_rng_seed(0)
    loss = make_estimator("meanfield", particles=4000).differentiable_loss(_layers, guide, x)
    grad = -torch.stack(torch.autograd.grad(loss, (a, b)))
    assert torch.allclose(grad, exact_grad, rtol=0.03), (grad, exact_grad)


def test_pyro_svi_with_meanfield_keeps_the_score_function_term():
    """Pyro's ``SVI`` calls ``loss_and_grads``, not ``differentiable_loss``: same rule there."""
    pyro.clear_param_store()

    def guide(x):
        logit = pyro.param("logit", torch.tensor(0.3))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=logit.expand(x.shape[0])))

    model, _ = _bernoulli_pair(torch.tensor(0.3))
    pyro.set_rng_seed(0)
    loss = make_estimator("meanfield", particles=20000).loss_and_grads(model, guide, X_BERN)
    grad = -float(pyro.get_param_store().get_param("logit").unconstrained().grad)
    pyro.clear_param_store()
    assert grad == pytest.approx(0.8312, rel=0.05)  # was -0.147
    assert -loss == pytest.approx(float(_exact_bernoulli_elbo(torch.tensor(0.3))), abs=0.05)
