"""What a sample site of a Pyro trace is: the one place for the filters that every estimator,
check and command applies to traces (a latent is sampled, neither observed nor one of the
subsample sites that ``pyro.plate`` records)."""

from __future__ import annotations

from pyro.poutine.util import site_is_subsample


def is_sample(site) -> bool:
    """A ``pyro.sample`` site, not a plate's subsample record."""
    return site["type"] == "sample" and not site_is_subsample(site)


def is_latent(site) -> bool:
    return is_sample(site) and not site["is_observed"]


def is_observed(site) -> bool:
    return is_sample(site) and site["is_observed"]


def latent_sites(trace) -> list[dict]:
    """The latent sites of a trace, in the order the program drew them."""
    return [s for s in trace.nodes.values() if is_latent(s)]


def observed_sites(trace) -> list[dict]:
    return [s for s in trace.nodes.values() if is_observed(s)]
