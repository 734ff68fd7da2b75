"""A user's Pyro programs as modules: building them from a name, finding their parameters.

A **model** is any Pyro program: a function, a bound method (Pyro's examples write
``vae.model`` and ``vae.guide``), an ``nn.Module`` or a ``PyroModule``, called as
``model(x, **context)``, with latent sample sites and one observed site inside a data plate. A
**guide** samples the model's latent sites, except those the model enumerates. The toolkit
finds what it needs by tracing; nothing else is required of a program.

Names (``--model``/``--guide``, ``config.model``/``config.guide``):

- a built-in name (``vae``, ``gaussian``, ...);
- ``package.module:Class``: an ``nn.Module`` whose ``forward`` is the program, or a class with
  ``model`` and ``guide`` methods (Pyro's VAE example), whose ``model`` serves ``--model`` and
  whose ``guide`` serves ``--guide``; ``package.module:Class.method`` names a method. Model and
  guide that name the same class share one instance, as in Pyro's example;
- ``package.module:function``: a plain function; its parameters (``pyro.param``,
  ``pyro.module``) are found by tracing it once.

A constructor receives, of ``x_dim, z_dim, hidden, activation, likelihood, train_mean, net,
image_shape, num_classes`` (and ``model`` for a guide), only the keywords it names (all of them
if it takes ``**kwargs``), plus the options given for it; a required argument that nothing
supplies is named in the error.
"""

from __future__ import annotations

import inspect
import warnings

import pyro
import torch
from pyro import poutine
from torch import nn

from pyro_vae.errors import ProgramError
from pyro_vae.registry import UnknownNameError, import_object

DATA_CONTEXT_KEYS = ("y",)  # per-row context a dataset provides: its labels
_inside_objective = [0]  # > 0 while pyro-vae's Objective runs the programs


class objective_scope:
    """Marks the programs' calls as made by pyro-vae's ``Objective``, which optimizes the
    modules' own parameters: built-ins then skip registering them with Pyro's param store."""

    def __enter__(self):
        _inside_objective[0] += 1

    def __exit__(self, *exc):
        _inside_objective[0] -= 1


class BuiltinProgram(nn.Module):
    """Base of the built-in models and guides: an ``nn.Module`` whose ``forward`` is a Pyro
    program, and which registers its parameters with Pyro (``pyro.module``) whenever it is called
    outside pyro-vae's ``Objective``, so that Pyro's own ``SVI`` (which collects parameters from
    a param-only trace) trains it with any Pyro ELBO. Inside the ``Objective`` the loop
    optimizes ``parameters()`` directly and skips that per-step bookkeeping."""

    def __call__(self, *args, **kwargs):
        if not _inside_objective[0]:
            with warnings.catch_warnings():  # frozen parameters are left out, as they should be
                warnings.filterwarnings("ignore", message=".*not registered in the param store")
                pyro.module(type(self).__name__, self)
        return super().__call__(*args, **kwargs)



class Program(nn.Module):
    """A Pyro program that is not itself an ``nn.Module`` (a function or a bound method), or a
    user's module that also keeps parameters in Pyro's param store, as one ``nn.Module``.

    Calling it calls the program. Its parameters are those of the module that owns the program
    (a bound method's instance) plus those the program registers with ``pyro.param`` or
    ``pyro.module``, found by ``find_params`` (one param-only trace), so a torch optimizer, a
    ``state_dict`` and ``.to(device)`` all see them. Attributes the wrapper lacks (``decode``,
    ``latent_sites``, ...) are looked up on the program, then on its owner.
    """

    def __init__(self, program, name: str = "program"):
        super().__init__()
        owner = getattr(program, "__self__", None)
        if isinstance(program, nn.Module):
            self.program = program
        else:
            self.__dict__["fn"] = program
            if isinstance(owner, nn.Module):
                self.owner = owner
        self.name = name
        self.found = nn.ParameterDict()
        self.bound = False

    def forward(self, *args, **kwargs):
        return self.call(*args, **kwargs)

    def call(self, *args, **kwargs):
        fn = self.__dict__.get("fn")
        return fn(*args, **kwargs) if fn is not None else self.program(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        for target in (self.__dict__.get("fn"), self._modules.get("program"), self._modules.get("owner")):
            if target is not None and hasattr(target, name):
                return getattr(target, name)
        raise AttributeError(f"{type(self).__name__} ({self.name}) has no attribute {name!r}")

    @property
    def signature_target(self):
        fn = self.__dict__.get("fn")
        return fn if fn is not None else self.program.forward

    def find_params(self, *args, **kwargs) -> None:
        """Trace the program once and keep every ``pyro.param`` it reads that the module does
        not already hold (the unconstrained tensor, as Pyro's SVI optimizes it)."""
        own = {id(p) for p in self.parameters()}
        with torch.no_grad(), pyro.validation_enabled(False):  # the values are checked later, once
            trace = poutine.trace(self.call, param_only=True).get_trace(*args, **kwargs)
        store = pyro.get_param_store()
        for name, site in trace.nodes.items():
            if site["type"] != "param":
                continue
            unconstrained = site["value"].unconstrained()
            if id(unconstrained) in own:
                continue
            if not isinstance(unconstrained, nn.Parameter):  # pyro.param's own tensor: make it a
                unconstrained = nn.Parameter(unconstrained.detach())  # Parameter the store reads
                store._params[name] = unconstrained
            self.found[_param_key(name)] = unconstrained
            own.add(id(unconstrained))
        self.bound = True


def _param_key(name: str) -> str:
    return name.replace(".", "/")


def bind(model, guide, *args, **kwargs) -> None:
    """Find the parameters of wrapped programs by one trace each (``Program.find_params``)."""
    for program in (model, guide):
        if isinstance(program, Program) and not program.bound:
            program.find_params(*args, **kwargs)


def as_module(program, name: str) -> nn.Module:
    """``program`` as an ``nn.Module``: itself if it is one of the toolkit's own modules, else a
    ``Program`` wrapper (functions, bound methods, and users' modules, which may keep
    parameters in Pyro's param store)."""
    if isinstance(program, nn.Module) and type(program).__module__.startswith("pyro_vae."):
        return program
    if isinstance(program, Program):
        return program
    if not callable(program):
        raise ProgramError(f"the {name} must be a callable Pyro program, got {type(program).__name__}")
    return Program(program, name)


def context_keys(model, guide=None) -> tuple[str, ...]:
    """The per-row context the programs take besides x: declared (``context_keys``), else the
    dataset keys (``y``, the labels) that the model's or guide's signature names."""
    for program in (model, guide):
        declared = getattr(program, "context_keys", None) if program is not None else None
        if declared:
            return tuple(declared)
    keys = []
    for program in (model, guide):
        if program is None:
            continue
        target = program.signature_target if isinstance(program, Program) else (
            program.forward if isinstance(program, nn.Module) else program)
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):
            continue
        keys += [k for k in DATA_CONTEXT_KEYS if k in params and k not in keys]
    return tuple(keys)


# ----------------------------------------------------------------------------------------------
# building programs from names


def _resolve(spec: str, registry):
    """(object, member): a registered built-in, or an import path ``module:attr[.member]``."""
    if spec in registry:
        return registry.get(spec), None
    if ":" not in spec:
        registry.get(spec)  # raises UnknownNameError listing the known names
    module, _, attr = spec.partition(":")
    head, dot, member = attr.partition(".")
    target = import_object(f"{module}:{head}", registry.kind)
    if inspect.isbuiltin(target) or not callable(target):  # os:system, a constant: no Pyro program
        raise ProgramError(f"{registry.kind} {spec!r} is a {type(target).__name__}, not a Pyro program: name a "
                           f"class (an nn.Module or a class with model/guide methods) or a Python function")
    if dot:
        if not hasattr(target, member.split(".")[0]):
            raise UnknownNameError(f"{head} in module {module!r} has no {member!r} (for {registry.kind} {spec!r})")
        return target, member
    return target, None


def construct(cls, offered: dict, options: dict, kind: str, spec: str):
    """``cls(**kwargs)`` with the offered keywords it accepts and every given option; one-line
    errors for options it does not take and required arguments nothing supplies."""
    where = f"{kind} {spec}"
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return cls(**offered, **options)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(names)) if not takes_any else []
    if unknown:
        raise ProgramError(f"{where} takes no option {', '.join(map(repr, unknown))}; its constructor takes "
                           f"{', '.join(names) or 'no arguments'}. Remove the option or fix its name.")
    kwargs = {k: v for k, v in offered.items() if takes_any or k in params}
    kwargs.update(options)
    missing = [n for n in names if params[n].default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise ProgramError(f"{where} needs {', '.join(map(repr, missing))}, which nothing supplies: give "
                           f"{'it' if len(missing) == 1 else 'them'} as {kind} options (TOML [{kind}_options], "
                           f"or --{kind}-option {missing[0]}=VALUE).")
    return cls(**kwargs)


def build_programs(model_spec: str, guide_spec: str, offered: dict, model_options: dict,
                   guide_options: dict, model_registry, guide_registry):
    """(model, guide) from their names; see the module docstring for what a name may be."""
    model_obj, model_member = _resolve(model_spec, model_registry)
    guide_obj, guide_member = _resolve(guide_spec, guide_registry)
    model_offered = dict(offered)
    guide_offered = {k: v for k, v in offered.items() if k not in ("likelihood", "train_mean")}
    instances: dict = {}

    def program(obj, member, kind, spec, options, kw):
        if not inspect.isclass(obj):
            if member is None and options:
                raise ProgramError(f"{kind} {spec!r} is a function: it takes no {kind} options "
                                   f"({', '.join(sorted(options))}); give a class to configure")
            return _member(obj, member, kind, spec)
        key = id(obj)
        if key not in instances:
            instances[key] = construct(obj, kw, options, kind, spec)
        elif options:
            raise ProgramError(f"model and guide share one instance of {obj.__name__}: give its options "
                               f"once, as model options")
        instance = instances[key]
        if member is None and not _has_own_forward(instance) and hasattr(instance, kind):
            member = kind  # a class with model and guide methods, as in Pyro's VAE example
        return _member(instance, member, kind, spec)

    model = program(model_obj, model_member, "model", model_spec, model_options, model_offered)
    if inspect.isclass(guide_obj) and "model" in _parameter_names(guide_obj) and id(guide_obj) not in instances:
        guide_offered["model"] = model  # guides built from their model (linear-posterior)
    guide = program(guide_obj, guide_member, "guide", guide_spec, guide_options, guide_offered)
    if hasattr(model, "tie"):  # models that use the guide, e.g. the VampPrior's q(z|u_k)
        model.tie(guide)
    return as_module(model, "model"), as_module(guide, "guide")


def _member(obj, member, kind, spec):
    for part in (member or "").split(".") if member else []:
        obj = getattr(obj, part)
    if not callable(obj):
        raise ProgramError(f"{kind} {spec!r} is not callable; name a Pyro program (function, method or module)")
    return obj


def _has_own_forward(instance) -> bool:
    return isinstance(instance, nn.Module) and type(instance).forward is not nn.Module.forward


def _parameter_names(cls) -> set[str]:
    try:
        return set(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return set()
