"""--jit: a traced objective takes the same steps as the eager one, for every traceable estimator."""

import copy

import pytest
import torch

from pyro_vae.errors import ConfigError, ProgramError
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


def _value_dependent_pair():
    """A Pyro user's model/guide whose control flow reads a tensor's value (a Python float)."""
    import pyro
    import pyro.distributions as dist

    decoder, encoder = torch.nn.Linear(2, 12), torch.nn.Linear(12, 4)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
            logits = decoder(z)
            if logits.mean() > 0:  # the branch taken depends on the parameters' values
                logits = logits - 1.0
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    from pyro_vae.programs import as_module, bind

    model, guide = as_module(model, "model"), as_module(guide, "guide")
    bind(model, guide, torch.zeros(2, 12))  # as training does: the functions' parameters found
    return model, guide


def test_a_program_that_reads_tensor_values_trains_eagerly_and_says_where():
    from pyro_vae.objectives.traced import trace_objective

    model, guide = _value_dependent_pair()
    said = []
    objective = trace_objective(Objective(model, guide, make_estimator("elbo")), None, say=said.append)
    x = torch.bernoulli(torch.rand(6, 12))
    torch.manual_seed(0)
    traced_loss = objective(x, beta=1.0)
    torch.manual_seed(0)
    assert torch.allclose(traced_loss, objective.objective(x, beta=1.0))  # the eager value, same draws
    assert objective.traced is False and len(said) == 1
    assert said[0].startswith("eager steps") and f"{__file__}:" in said[0]  # names the user's line
    objective(x, beta=1.0)
    assert len(said) == 1  # said once

    strict = trace_objective(Objective(model, guide, make_estimator("elbo")), True)
    with pytest.raises(ProgramError, match=r"--jit: the program turns a tensor into a Python value at .*test_traced"):
        strict(x, beta=1.0)
    assert trace_objective(Objective(model, guide, make_estimator("elbo")), False).__class__ is Objective


def test_objectives_a_trace_cannot_replay_are_eager_by_default_and_refused_under_jit():
    from pyro_vae.objectives import KLPenaltyObjective
    from pyro_vae.objectives.traced import trace_objective

    penalty = KLPenaltyObjective(VAE(x_dim=12, z_dim=3, hidden=[8]), GaussianGuide(x_dim=12, z_dim=3, hidden=[8]),
                                 make_estimator("elbo"))
    said = []
    assert trace_objective(penalty, None, say=said.append) is penalty
    assert len(said) == 1 and "KLPenaltyObjective" in said[0]
    with pytest.raises(ConfigError, match="--jit: KLPenaltyObjective .* drop --jit"):
        trace_objective(penalty, True)


def test_a_size_taken_from_tensor_values_is_caught_on_the_next_batch():
    """Rows split by a mask (as semi-supervised programs split labelled rows): the trace freezes
    the split's size, which the check on the second batch finds; training goes on eagerly."""
    import warnings

    import pyro
    import pyro.distributions as dist

    from pyro_vae.objectives.traced import trace_objective
    from pyro_vae.programs import as_module, bind

    decoder, encoder = torch.nn.Linear(2, 12), torch.nn.Linear(12, 4)

    def labelled(x, y):
        keep = x[y > 0]  # as many rows as the labels say
        with warnings.catch_warnings():  # a program that silences the tracer's warning about len()
            warnings.simplefilter("ignore")
            return keep, len(keep)

    def model(x, y):
        pyro.module("decoder", decoder)
        keep, n = labelled(x, y)
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(torch.zeros(n, 2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=keep)

    def guide(x, y):
        pyro.module("encoder", encoder)
        keep, n = labelled(x, y)
        with pyro.plate("data", n):
            loc, log_scale = encoder(keep).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    model, guide = as_module(model, "model"), as_module(guide, "guide")
    x = torch.bernoulli(torch.rand(6, 12))
    bind(model, guide, x, y=torch.ones(6))
    said = []
    objective = trace_objective(Objective(model, guide, make_estimator("elbo")), None, say=said.append)
    objective(x, beta=1.0, y=torch.tensor([1.0, 1, 1, 0, 0, 0]))
    assert objective.traced and not said
    torch.manual_seed(3)
    loss = objective(x, beta=1.0, y=torch.tensor([1.0, 1, 0, 0, 0, 0]))
    torch.manual_seed(3)
    assert torch.allclose(loss, objective.objective(x, beta=1.0, y=torch.tensor([1.0, 1, 0, 0, 0, 0])))
    assert not objective.traced and len(said) == 1 and said[0].startswith("eager steps: the traced objective")


def test_tracing_and_its_checks_leave_batch_norm_statistics_as_eager_steps_do():
    class NormedGuide(GaussianGuide):
        def __init__(self):
            super().__init__(x_dim=12, z_dim=3, hidden=[8])
            self.norm = torch.nn.BatchNorm1d(12)

        def forward(self, x, **context):
            return super().forward(self.norm(x), **context)

    torch.manual_seed(0)
    eager = Objective(VAE(x_dim=12, z_dim=3, hidden=[8]), NormedGuide(), make_estimator("elbo"))
    traced = TracedObjective(copy.deepcopy(eager))
    x = torch.bernoulli(torch.rand(6, 12))
    loss_e, params_e = _two_steps(eager, x, 1.0)
    loss_t, params_t = _two_steps(traced, x, 1.0)
    assert torch.allclose(loss_e, loss_t, rtol=1e-5)
    assert torch.allclose(eager.guide.norm.running_mean, traced.objective.guide.norm.running_mean)
    assert int(traced.objective.guide.norm.num_batches_tracked) == 2


def test_a_plate_sized_by_len_of_the_batch_is_traced():
    """``pyro.plate("data", len(x))``, as many Pyro users write it: a size the traces are keyed by."""
    import pyro
    import pyro.distributions as dist

    from pyro_vae.objectives.traced import trace_objective
    from pyro_vae.programs import as_module, bind

    decoder, encoder = torch.nn.Linear(2, 12), torch.nn.Linear(12, 4)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x), 2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", len(x)):
            loc, log_scale = encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    model, guide = as_module(model, "model"), as_module(guide, "guide")
    bind(model, guide, torch.zeros(2, 12))
    said = []
    objective = trace_objective(Objective(model, guide, make_estimator("iwae:K=3")), None, say=said.append)
    for rows in (6, 6, 4, 4):  # two shapes, each traced and checked twice
        objective(torch.bernoulli(torch.rand(rows, 12)), beta=1.0)
    assert objective.traced and not said
