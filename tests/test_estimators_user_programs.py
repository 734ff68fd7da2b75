"""Every estimator on Pyro programs written the way Pyro users write them: ``pyro.param``,
subsampling plates, ``poutine.scale``, global latents, feature plates, several arguments,
model-side enumeration, no parameters at all. Values are checked against Pyro's Trace_ELBO (K = 1)
and against the bounds written out by hand from the traced draws."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_vae.objectives import SiteMismatchError, check_pair, make_estimator
from pyro_vae.objectives.base import PARTICLE_PLATE, pair_traces

IW = ["iwae", "stl", "dreg", "miwae", "ciwae", "piwae", "renyi"]
ALL = ["elbo", "meanfield", "enum"] + IW
N, B, D = 50, 2, 3


@pytest.fixture(autouse=True)
def float64_and_fresh_params():
    pyro.clear_param_store()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
    pyro.clear_param_store()


def normal_lp(v, loc, scale):
    scale = torch.as_tensor(scale)
    return -0.5 * math.log(2 * math.pi) - torch.log(scale) - 0.5 * ((v - loc) / scale) ** 2


def lme(t, dim=0):
    return torch.logsumexp(t, dim) - math.log(t.shape[dim])


def spec(name, k):
    return {"miwae": f"miwae:M=1,K={k}", "piwae": f"piwae:M=1,K={k}", "ciwae": f"ciwae:beta=0.5,K={k}",
            "renyi": f"renyi:alpha=0,K={k}"}.get(name, f"{name}:K={k}")


def full_data():
    return torch.linspace(-2, 2, N * 2).reshape(N, 2)


# -- programs ---------------------------------------------------------------------------------

def subsampled_model(x):
    """z_n ~ N(0, 1), x_n ~ N(w z_n, 0.5^2 I): the full data in, a minibatch of B out."""
    w = pyro.param("w", torch.tensor([1.0, -0.5]))
    with pyro.plate("data", len(x), subsample_size=B) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1) * w, 0.5).to_event(1), obs=x[idx])


def subsampled_guide(x):
    a = pyro.param("a", torch.tensor([0.3, 0.2]))
    with pyro.plate("data", len(x), subsample_size=B) as idx:
        pyro.sample("z", dist.Normal(x[idx] @ a, 0.7))


def scaled_model(x):
    """The same model on a minibatch given by the caller, scaled by N/B with poutine.scale."""
    w = pyro.param("w", torch.tensor([1.0, -0.5]))
    with poutine.scale(scale=N / len(x)), pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1) * w, 0.5).to_event(1), obs=x)


def scaled_guide(x):
    a = pyro.param("a", torch.tensor([0.3, 0.2]))
    with poutine.scale(scale=N / len(x)), pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(x @ a, 0.7))


def global_model(x):
    """theta ~ N(0, 1) shared by all points; z_n ~ N(0, 1); x_n ~ N(theta + z_n, 0.5^2)."""
    theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(theta + z, 0.5), obs=x)


def global_guide(x):
    m = pyro.param("m", torch.tensor(0.2))
    pyro.sample("theta", dist.Normal(m, 0.5))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(0.5 * x, 0.8))


def feature_model(x):
    """The data plate at dim -2 under a feature plate: z_n ~ N(0, 1), x_nd ~ N(z_n, 1)."""
    features, data = pyro.plate("features", x.shape[1], dim=-1), pyro.plate("data", len(x), dim=-2)
    with data:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with features, data:
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def feature_guide(x):
    with pyro.plate("data", len(x), dim=-2):
        pyro.sample("z", dist.Normal(x.mean(-1, keepdim=True), 0.6))


def two_argument_model(x, y):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z + y, 1.0), obs=x)


def two_argument_guide(x, y):
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(0.5 * (x - y), 0.8))


def keyword_model(*, data):
    return two_argument_model(data[0], data[1])


def keyword_guide(*, data):
    return two_argument_guide(data[0], data[1])


def mixture_model(x):
    """A mixture prior whose component c is enumerated in the model only (the guide samples z)."""
    logits = pyro.param("logits", torch.tensor([0.2, -0.3]))
    locs = pyro.param("locs", torch.tensor([-1.0, 2.0]))
    with pyro.plate("data", len(x)):
        c = pyro.sample("c", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(locs[c], 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)


def mixture_guide(x):
    a = pyro.param("a", torch.tensor(0.7))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(a * x, 0.6))


def traced_draws(model, guide, args, k, plates, seed):
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        return pair_traces(model, guide, args, {}, k, plates)


# -- 1. the subsampling scale multiplies the bound from outside -------------------------------

@pytest.mark.parametrize("name", IW)
def test_subsampled_bound_is_n_over_b_times_the_sum_of_per_point_bounds(name):
    """(N/B) sum_b logmeanexp_k log w_bk with unscaled log w, the full data given to the plate."""
    x, k = full_data(), 5
    pyro.set_rng_seed(3)
    loss = make_estimator(spec(name, k), max_plate_nesting=1).loss(subsampled_model, subsampled_guide, x)
    _, guide_trace = traced_draws(subsampled_model, subsampled_guide, (x,), k, 1, seed=3)
    idx, z = guide_trace.nodes["data"]["value"], guide_trace.nodes["z"]["value"]  # (B,), (K, B)
    w, a = pyro.param("w").detach(), pyro.param("a").detach()
    xb = x[idx]
    lw = (normal_lp(xb, z.unsqueeze(-1) * w, 0.5).sum(-1) + normal_lp(z, 0.0, 1.0)
          - normal_lp(z, xb @ a, 0.7))
    bound = 0.5 * lw.mean(0) + 0.5 * lme(lw) if name == "ciwae" else lme(lw)
    assert loss == pytest.approx(-(N / B) * float(bound.sum()), rel=1e-10)


def test_poutine_scale_is_outside_the_logsumexp_too():
    x, k = full_data()[:B], 5
    pyro.set_rng_seed(0)
    loss = make_estimator(f"iwae:K={k}").loss(scaled_model, scaled_guide, x)
    _, guide_trace = traced_draws(scaled_model, scaled_guide, (x,), k, 1, seed=0)
    z = guide_trace.nodes["z"]["value"]
    w, a = pyro.param("w").detach(), pyro.param("a").detach()
    lw = normal_lp(x, z.unsqueeze(-1) * w, 0.5).sum(-1) + normal_lp(z, 0.0, 1.0) - normal_lp(z, x @ a, 0.7)
    inside = -float(lme((N / B) * lw).sum())  # the scale inside the weights: not a bound
    assert loss == pytest.approx(-(N / B) * float(lme(lw).sum()), rel=1e-10)
    assert abs(loss - inside) > 1.0


@pytest.mark.parametrize("name", IW)
@pytest.mark.parametrize("program", ["subsampled", "global", "feature", "two_arguments"])
def test_one_particle_equals_trace_elbo(name, program):
    """At K = 1 every importance-weighted estimator is the ELBO: Pyro's Trace_ELBO on the same draws."""
    model, guide, args = {
        "subsampled": (subsampled_model, subsampled_guide, (full_data(),)),
        "global": (global_model, global_guide, (torch.tensor([0.5, -1.0, 2.0, 0.3]),)),
        "feature": (feature_model, feature_guide, (torch.linspace(-1, 2, 12).reshape(4, D),)),
        "two_arguments": (two_argument_model, two_argument_guide, (torch.tensor([0.5, -1.0]), torch.tensor([1.0, 0.0]))),
    }[program]
    estimator = make_estimator(spec(name, 1))
    estimator.loss(model, guide, *args)  # the first call guesses max_plate_nesting
    pyro.set_rng_seed(11)
    ours = estimator.differentiable_loss(model, guide, *args)
    pyro.set_rng_seed(11)
    theirs = Trace_ELBO().differentiable_loss(model, guide, *args)
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-12)


# -- 2. global latents enter each particle's weight once --------------------------------------

def test_global_latent_weight_is_the_whole_batch_with_global_terms_once():
    x, k = torch.tensor([0.5, -1.0, 2.0, 0.3]), 4
    pyro.set_rng_seed(5)
    loss = make_estimator(f"iwae:K={k}", max_plate_nesting=1).loss(global_model, global_guide, x)
    _, guide_trace = traced_draws(global_model, global_guide, (x,), k, 1, seed=5)
    theta = guide_trace.nodes["theta"]["value"].reshape(k)
    z = guide_trace.nodes["z"]["value"]  # (K, B)
    m = pyro.param("m").detach()
    lw = (normal_lp(theta, 0.0, 1.0) - normal_lp(theta, m, 0.5)
          + (normal_lp(x, theta[:, None] + z, 0.5) + normal_lp(z, 0.0, 1.0) - normal_lp(z, 0.5 * x, 0.8)).sum(-1))
    assert loss == pytest.approx(-float(lme(lw)), rel=1e-10)


def test_global_latent_bounds_are_ordered_up_to_the_exact_log_marginal():
    """ELBO <= IWAE_5 <= IWAE_50 <= log p(x) on a linear-Gaussian program with a global latent,
    where x ~ N(0, 11^T + (1 + 0.25) I) exactly."""
    x = torch.tensor([0.9, -0.4, 1.6, 0.2, 0.7])
    cov = torch.ones(5, 5) + 1.25 * torch.eye(5)
    log_px = float(dist.MultivariateNormal(torch.zeros(5), cov).log_prob(x))
    pyro.set_rng_seed(2)
    bounds = {k: -sum(make_estimator(f"iwae:K={k}", max_plate_nesting=1).loss(global_model, global_guide, x)
                      for _ in range(100)) / 100 for k in (1, 5, 50)}
    assert bounds[1] < bounds[5] - 0.05 < bounds[50] - 0.1 < log_px, (bounds, log_px)


# -- 3. the data plate wherever it sits --------------------------------------------------------

@pytest.mark.parametrize("name", ["iwae", "dreg", "piwae"])
def test_data_plate_under_a_feature_plate_keeps_one_weight_per_data_point(name):
    x, k = torch.linspace(-1, 2, 12).reshape(4, D), 3
    estimator = make_estimator(spec(name, k))
    pyro.set_rng_seed(7)
    loss = estimator.differentiable_loss(feature_model, feature_guide, x)
    assert estimator.max_plate_nesting == 3  # guessed: two plates, then the particle plate
    _, guide_trace = traced_draws(feature_model, feature_guide, (x,), k, 2, seed=7)
    z = guide_trace.nodes["z"]["value"]  # (K, B, 1)
    lw = (normal_lp(x, z, 1.0).sum(-1) + normal_lp(z, 0.0, 1.0)[..., 0]
          - normal_lp(z, x.mean(-1, keepdim=True), 0.6)[..., 0])
    assert float(loss) == pytest.approx(-float(lme(lw).sum()), rel=1e-10)


# -- 4. the particle plate ---------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("given", [None, 1, 2])
def test_particle_plate_sits_left_of_every_plate_for_any_k(k, given):
    x = torch.tensor([0.5, -1.0, 2.0])
    options = {} if given is None else {"max_plate_nesting": given}
    estimator = make_estimator(f"iwae:K={k}", **options)
    model_trace, _ = estimator._get_trace(global_model, global_guide, (x,), {})
    frame = next(f for f in model_trace.nodes["z"]["cond_indep_stack"] if f.name == PARTICLE_PLATE)
    plates = 1 if given is None else given
    assert frame.dim == -(plates + 1) == -estimator.max_plate_nesting
    assert model_trace.nodes["z"]["value"].shape == (k,) + (1,) * (plates - 1) + (3,)


def test_one_particle_needs_no_particle_plate():
    """K = 1 traces the programs as they are, as Pyro's ELBOs do: no plate of size 1 to collide
    with a program's own dims (Pyro's test_plate_param_size_mismatch_error)."""
    x = torch.tensor([0.5, -1.0, 2.0])
    estimator = make_estimator("iwae:K=1")
    model_trace, _ = estimator._get_trace(global_model, global_guide, (x,), {})
    assert all(f.name != PARTICLE_PLATE for f in model_trace.nodes["z"]["cond_indep_stack"])
    assert model_trace.nodes["z"]["value"].shape == (3,)


# -- 5. model/guide validation -----------------------------------------------------------------

def test_guide_with_another_shape_is_refused_by_name():
    def wide_guide(x, y):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(torch.zeros(len(x), 2), 1.0).to_event(1))

    x = torch.tensor([0.5, -1.0, 2.0])
    with pytest.raises(SiteMismatchError, match=r"shape of site 'z'.*\(3,\).*\(3, 2\).*to_event"):
        check_pair(two_argument_model, wide_guide, x, torch.zeros(3))


def test_guide_missing_a_model_site_is_refused_by_name():
    x = torch.tensor([0.5, -1.0, 2.0])
    with pytest.raises(SiteMismatchError, match=r"guide does not sample \['theta'\]"):
        check_pair(global_model, lambda x: two_argument_guide(x, 0.0), x)
    with pytest.raises(SiteMismatchError, match=r"model site 'theta' is not sampled by the guide"):
        make_estimator("iwae:K=2").loss(global_model, lambda x: two_argument_guide(x, 0.0), x)


def test_plate_dim_collision_is_refused_by_name():
    def colliding_model(x):
        with pyro.plate("data", len(x), dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2, len(x)]))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def colliding_guide(x):
        with pyro.plate("data", len(x), dim=-1):
            pyro.sample("z", dist.Normal(0.0, 1.0).expand([2, len(x)]))

    with pytest.raises(SiteMismatchError, match=r"site 'z'"):
        check_pair(colliding_model, colliding_guide, torch.zeros(3))


def test_model_side_enumeration_is_accepted_by_the_pairing_check():
    check_pair(mixture_model, mixture_guide, torch.tensor([0.5, -1.0, 2.0]))


# -- 6. programs without trainable parameters --------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_program_without_parameters_returns_its_loss(name):
    def model(x):
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(pyro.sample("z", dist.Normal(0.0, 1.0)), 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(0.5 * x, 0.8))

    x = torch.tensor([0.5, -1.0, 2.0])
    estimator = make_estimator(spec(name, 2) if name in IW else name)
    assert math.isfinite(estimator.loss_and_grads(model, guide, x))
    assert math.isfinite(float(estimator.differentiable_loss(model, guide, x)))


# -- 7. enum: model-side enumeration, keyword data, no_grad ------------------------------------

def test_enum_sums_a_model_enumerated_component_exactly():
    """-loss = log sum_c pi_c N(z | mu_c, 1) + log N(x | z, 0.5^2) - log q(z | x), z ~ q."""
    x = torch.tensor([0.5, -1.0, 2.0])
    estimator = make_estimator("enum", max_plate_nesting=1)
    pyro.set_rng_seed(9)
    loss = estimator.differentiable_loss(mixture_model, mixture_guide, x)
    pyro.set_rng_seed(9)
    z = poutine.trace(mixture_guide).get_trace(x).nodes["z"]["value"].detach()
    logits, locs, a = (pyro.param(n).detach() for n in ("logits", "locs", "a"))
    log_pi = torch.log_softmax(logits, -1)
    log_prior = torch.logsumexp(log_pi + normal_lp(z[:, None], locs, 1.0), -1)
    expected = -(log_prior + normal_lp(x, z, 0.5) - normal_lp(z, a * x, 0.6)).sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-10)
    loss.backward()
    assert pyro.param("logits").grad.abs().sum() > 0


def test_enum_trains_a_model_enumerated_mixture_prior_under_svi():
    x = torch.cat([torch.full((20,), -1.0), torch.full((20,), 2.5)])
    svi = SVI(mixture_model, mixture_guide, Adam({"lr": 0.05}), loss=make_estimator("enum"))
    pyro.set_rng_seed(0)
    first = sum(svi.evaluate_loss(x) for _ in range(20)) / 20
    for _ in range(150):
        svi.step(x)
    last = sum(svi.evaluate_loss(x) for _ in range(20)) / 20
    assert last < first - 2.0, (first, last)


def test_enum_answers_under_no_grad_with_keyword_data():
    x, y = torch.tensor([0.5, -1.0]), torch.tensor([1.0, 0.0])
    with torch.no_grad():
        loss = make_estimator("enum").differentiable_loss(keyword_model, keyword_guide, data=(x, y))
    assert math.isfinite(float(loss))


# -- 8. any arguments --------------------------------------------------------------------------

@pytest.mark.parametrize("name", IW)
def test_keyword_only_programs_equal_their_positional_twins(name):
    x, y = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 0.0, -1.0])
    estimator = make_estimator(spec(name, 3), max_plate_nesting=1)
    pyro.set_rng_seed(4)
    positional = estimator.loss(two_argument_model, two_argument_guide, x, y)
    pyro.set_rng_seed(4)
    keyword = estimator.loss(keyword_model, keyword_guide, data=(x, y))
    assert keyword == positional


# -- 9 and SVI: score-function sites are refused, SVI trains with every estimator ------------

@pytest.mark.parametrize("name", IW)
def test_model_site_sampled_from_its_prior_is_refused_not_dropped(name):
    """With IW estimators a model latent not drawn by the guide would be weighted wrongly."""
    x = torch.tensor([0.5, -1.0, 2.0])
    with pytest.raises(SiteMismatchError, match=r"'c'.*'enum'"):
        make_estimator(spec(name, 2)).loss(mixture_model, mixture_guide, x)


@pytest.mark.parametrize("name", ALL)
def test_pyro_svi_trains_with_every_estimator(name):
    x = full_data()
    svi = SVI(subsampled_model, subsampled_guide, Adam({"lr": 0.1}),
              loss=make_estimator(spec(name, 2) if name in IW else name))
    pyro.set_rng_seed(1)
    losses = [svi.step(x) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    assert pyro.param("a").detach().tolist() != [0.3, 0.2]
    assert pyro.param("w").detach().tolist() != [1.0, -0.5]


# -- Pyro's own validation, as Pyro's tests/infer/test_valid_models checks it ----------------------

def _event_dims_model():
    pyro.sample("x", dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1))


def _event_dims_guide():
    loc = pyro.param("loc", torch.zeros(2, 1, requires_grad=True))
    pyro.sample("x", dist.Normal(loc, 1.0).to_event(2))


def _shape_guide():
    pyro.sample("x", dist.Normal(pyro.param("l", torch.zeros(3, requires_grad=True)), 1.0).to_event(1))


def _empty_model():
    pass


def _factor_guide():
    pyro.factor("f", torch.tensor(0.0))


@pytest.mark.parametrize("spec", ["iwae:K=3", "stl", "dreg:K=3", "piwae:M=2,K=2", "miwae:M=2,K=2", "ciwae:K=2", "renyi:alpha=0.5,K=2"])
@pytest.mark.parametrize("model, guide, match", [
    (_event_dims_model, _event_dims_guide, "event_dims disagree at site 'x'"),
    (_event_dims_model, _shape_guide, "shapes disagree at site 'x'"),
    (_empty_model, _factor_guide, "missing specification of has_rsample"),
])
def test_pyro_validation_refuses_invalid_pairs_in_every_estimator(spec, model, guide, match):
    with pyro.validation_enabled(True), pytest.raises(ValueError, match=match):
        make_estimator(spec).differentiable_loss(model, guide)


@pytest.mark.parametrize("spec", ["iwae:K=3", "dreg:K=3", "iwae"])
def test_program_without_latents_gives_its_loss(spec):
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.tensor(0.5))

    loss = make_estimator(spec).differentiable_loss(model, _empty_model)
    assert float(loss) == pytest.approx(-float(dist.Normal(0.0, 1.0).log_prob(torch.tensor(0.5))))
