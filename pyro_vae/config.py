"""Training configuration, architecture presets, and building a model/guide pair from them."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pyro_vae.errors import ConfigError
from pyro_vae.settings import check_all, declarations, flag_name, setting

# This module imports neither torch nor the model families at import time, so that the
# `pyro-vae` flags (generated from TrainConfig) come up fast; names are looked up when checked.


def _names(module: str, attr: str):
    """The names in ``pyro_vae.<module>.<attr>`` (a registry, dict or tuple), read when needed."""
    def names():
        import importlib

        found = getattr(importlib.import_module(f"pyro_vae.{module}"), attr)
        return tuple(found.names() if hasattr(found, "names") else found)
    return names

# Architectures from the literature. A preset fills the architecture; explicit flags win.
PRESETS: dict[str, dict] = {
    # The classic PyTorch example VAE (pytorch/examples vae/main.py): 784-400-20, ReLU.
    "seed": {"z_dim": 20, "hidden": [400], "activation": "relu", "init_output_bias": False},
    # Burda et al. 2016, one stochastic layer: 784-200-200-50, tanh, output bias = logit(mean).
    "iwae1": {"z_dim": 50, "hidden": [200, 200], "activation": "tanh", "init_output_bias": True},
    # Burda et al. 2016, two stochastic layers: 784-200-200-z1(100)-100-100-z2(50), tanh.
    "iwae2": {"model": "hvae2", "guide": "hvae2", "z_dim": 50, "hidden": [200, 200],
              "activation": "tanh", "init_output_bias": True},
}


POSITIVE = dict(kind=int, at_least=1)
COUNT = dict(kind=int, at_least=0)
NONNEGATIVE = dict(kind=float, at_least=0)


@dataclass
class TrainConfig:
    """Everything needed to repeat a run (and rebuild its model); saved as config.json.

    Each field is declared once (``pyro_vae.settings.setting``): its type, range and help text
    give the ``pyro-vae train`` flag, the check of a TOML config key and the check here."""

    # data
    dataset: str = setting("binarized-mnist", "mnist, binarized-mnist, or a .npy/.pt file or image folder",
                           metavar="NAME|FILE")
    data_dir: str | None = setting(None, "MNIST cache folder (default $PYRO_VAE_DATA or ~/.cache/pyro-vae)",
                                   optional=True, resumable=True, metavar="DIR")
    validation: int = setting(0, "hold out the last N training points for validation", **COUNT)
    train_size: int | None = setting(None, "use only the first N training points", **POSITIVE, optional=True)
    test_size: int | None = setting(None, "use only the first N test points", **POSITIVE, optional=True)
    image_size: int | None = setting(None, "resize image-folder images to N x N", **POSITIVE, optional=True)
    labels: int | None = setting(None, "semi-supervised: keep N training labels (balanced over classes), hide "
                                       "the rest", **POSITIVE, optional=True)
    labelled_every: int = setting(0, "with --labels: a labelled batch after every N unlabelled ones, cycling "
                                     "the labelled rows (0: each labelled row once per epoch)", **COUNT)
    classes: list[int] | None = setting(None, "train and test on the rows of these labels only, e.g. --classes "
                                              "0 1 2 3 4 5 6 7 8 (`pyro-vae anomaly RUN` then scores the other "
                                              "classes as anomalies)", **COUNT, many=True, optional=True)
    standardize: bool = setting(False, "continuous data: standardize each feature by the training rows' mean "
                                       "and sd (stored in config.json); log p(x) is still reported in the "
                                       "data's own units", kind=bool)
    # model and guide
    preset: str | None = setting(None, "architecture preset: seed (784-400-20, ReLU), iwae1 (784-200-200-50, "
                                       "tanh) or iwae2 (two stochastic layers)", choices=lambda: tuple(PRESETS),
                                 optional=True)
    model: str = setting("vae", "model name (vae, linear, hvae2, cvae, ...; see the README) or "
                                "package.module:Class", choices=_names("models", "MODELS"), import_path=True)
    guide: str = setting("gaussian", "guide name (gaussian, hvae2, conditional, ...; see the README) or "
                                     "package.module:Class", choices=_names("guides", "GUIDES"),
                         import_path=True)
    z_dim: int = setting(20, "latent dimensions", **POSITIVE)
    hidden: list[int] = setting([400], "hidden layer sizes, e.g. --hidden 200 200", **POSITIVE, many=True)
    activation: str = setting("relu", "activation of the hidden layers", choices=_names("nets", "ACTIVATIONS"))
    likelihood: str | None = setting(None, "bernoulli, continuous-bernoulli, gaussian, laplace, "
                                           "discretized-logistic (8-bit); default: the model's own (gaussian "
                                           "for linear)", choices=_names("likelihoods", "LIKELIHOODS"),
                                     import_path=True, optional=True)
    net: str = setting("mlp", "encoder/decoder networks: mlp; conv (two stride-2 convolutions: images 28x28 or 32x32, any channels); conv4 (four, Locatello et al.'s: 64x64)",
                       choices=_names("nets", "NETS"))
    init_output_bias: bool = setting(False, "initialise the decoder output bias from the training mean", kind=bool)
    model_options: dict = setting({}, "arguments of the model's constructor (--model-option KEY=VALUE)", kind=dict)
    guide_options: dict = setting({}, "arguments of the guide's constructor (--guide-option KEY=VALUE)", kind=dict)
    # objective
    estimator: str = setting("meanfield", "elbo, meanfield, iwae, stl, dreg, miwae, ciwae, piwae, renyi, enum; "
                                          "options as in iwae:K=50", metavar="SPEC")
    particles: int = setting(1, "particles K per data point (vectorized)", **POSITIVE)
    beta: float = setting(1.0, "KL weight (beta-VAE); the target of a warm-up", **NONNEGATIVE)
    warmup_epochs: int = setting(0, "raise beta linearly from 0 over N epochs", **COUNT)
    cycle_epochs: float = setting(0.0, "cyclical annealing (Fu et al. 2019): restart the beta ramp every N "
                                       "epochs (0: off)", **NONNEGATIVE)
    cycle_ratio: float = setting(0.5, "fraction of each cycle over which beta rises from 0", kind=float,
                                 above=0, at_most=1)
    capacity: float | None = setting(None, "capacity annealing (Burgess et al. 2018): target KL C in nats; loss "
                                           "gamma*|KL - C|", **NONNEGATIVE, optional=True)
    capacity_epochs: float = setting(0.0, "raise the capacity C linearly from 0 over N epochs", **NONNEGATIVE)
    gamma: float = setting(1000.0, "weight gamma of the capacity penalty gamma*|KL - C|", kind=float, above=0)
    free_bits: float = setting(0.0, "free bits (Kingma et al. 2016): KL floor lambda in nats per latent "
                                    "dimension", **NONNEGATIVE)
    # optimisation
    epochs: int = setting(10, "number of epochs (on --resume: the total to reach)", **POSITIVE, resumable=True)
    early_stopping: int = setting(0, "with --validation: stop after N epochs without a better validation loss "
                                     "(or, for ssvae, accuracy); the best epoch's weights are kept in "
                                     "RUN/best.pt either way (0: off)", **COUNT, resumable=True)
    batch_size: int = setting(100, "data points per step", **POSITIVE)
    lr: float = setting(1e-3, "Adam learning rate", kind=float, above=0, resumable=True)
    lr_decay: float = setting(1.0, "multiply the learning rate by this factor after every epoch (exponential "
                                   "decay; 1: constant)", kind=float, above=0, at_most=1, resumable=True)
    weight_decay: float = setting(0.0, "Adam weight decay", **NONNEGATIVE)
    clip_grad: float | None = setting(None, "clip the gradient norm to this value", kind=float, above=0,
                                      optional=True, resumable=True)
    seed: int = setting(0, "random seed (identical runs on CPU)", **COUNT)
    device: str = setting("auto", "auto, cpu, cuda or cuda:N", resumable=True)
    jit: bool | None = setting(None, "trace the objective once and replay it: faster steps, the same numbers "
                                     "(default: traced where the program allows it, else eager with one line "
                                     "saying why; --jit: traced or refused; --no-jit: eager)", kind=bool,
                               optional=True, resumable=True)
    amp: str | None = setting(None, "bf16: the networks' matrix products in bfloat16, log-densities and loss in "
                                    "float32", choices=("bf16",), optional=True, resumable=True)
    tensorboard: bool = setting(False, "also log scalars and sample grids to RUN/tensorboard (pip install "
                                       "tensorboard)", kind=bool, resumable=True)
    image_shape: list[int] | None = setting(None, "show and model flat rows as C H W images, e.g. --image-shape "
                                                  "1 28 28 for 784 features (default: the data's, for images; "
                                                  "none for points)", **POSITIVE, many=True, length=3,
                                            optional=True, metavar="C H W")
    # filled in from the data when training starts
    x_dim: int | None = setting(None, "features per data point", **POSITIVE, optional=True, flag=False)
    num_classes: int | None = setting(None, "classes of the labels", **POSITIVE, optional=True, flag=False)
    standardization: dict | None = setting(None, "with standardize: the training rows' mean and sd (see "
                                                 "data.Standardization)", kind=dict, optional=True, flag=False)
    kl_methods: dict | None = setting(None, "meanfield: per latent site, closed form or Monte Carlo (why)",
                                      kind=dict, optional=True, flag=False)

    def __post_init__(self):
        check_all(self)  # every field against its declaration
        if self.likelihood is None:
            self.likelihood = _default_likelihood(self.model)
        from pyro_vae.likelihoods import BERNOULLI_FAMILY
        from pyro_vae.models import MODELS

        if self.standardize and self.likelihood in BERNOULLI_FAMILY and self.model in MODELS:
            raise ConfigError(f"--standardize makes the data real-valued, and the {self.likelihood} likelihood "
                              f"needs data in [0, 1]: drop --standardize, or use --likelihood gaussian (or laplace)")
        if self.warmup_epochs and self.cycle_epochs:
            raise ConfigError("--warmup-epochs and --cycle-epochs are two beta schedules: choose one")
        if self.capacity is not None and self.free_bits:
            raise ConfigError("--capacity and --free-bits are two different KL penalties: choose one")
        if self.labelled_every and not self.labels:
            raise ConfigError("--labelled-every interleaves the labelled rows that --labels keeps: add --labels N")
        _check_estimator(self.estimator, self.particles)
        _check_device(self.device)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = {k.replace("-", "_"): v for k, v in d.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            close = {k: difflib.get_close_matches(k, known, 1) for k in unknown}
            hints = "; ".join(f"{k!r}: did you mean {c[0]!r}?" for k, c in close.items() if c)
            raise ConfigError(f"unknown config keys {unknown}{' (' + hints + ')' if hints else ''}; "
                              f"known keys: {', '.join(sorted(known))}")
        preset = d.get("preset")
        if preset is not None:
            declarations(cls)["preset"].check("preset", preset)
            d = {**PRESETS[preset], **d}
        return cls(**d)

    def lr_at(self, epoch: int) -> float:
        """The learning rate of ``epoch`` (from 1): lr * lr_decay ** (epoch - 1)."""
        return self.lr * self.lr_decay ** (epoch - 1)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> TrainConfig:
        """The settings of a TOML file (its keys are the flags' names), ``overrides`` winning."""
        try:
            with open(path, "rb") as f:
                d = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        try:
            return cls.from_dict({**d, **overrides})
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_estimator(spec: str, particles: int) -> None:
    """An estimator spec names a registered estimator, with options it accepts."""
    from pyro_vae.objectives import ESTIMATORS, make_estimator

    name = spec.partition(":")[0].strip()
    if name not in ESTIMATORS:
        close = difflib.get_close_matches(name, ESTIMATORS.names(), 1)
        raise ConfigError(f"estimator = {spec!r}: unknown estimator {name!r}"
                          f"{f' (did you mean {close[0]!r}?)' if close else ''}; choose one of "
                          f"{', '.join(ESTIMATORS.names())}, with options as in iwae:K=5")
    try:
        make_estimator(spec, particles)
    except ConfigError as e:
        raise ConfigError(f"estimator = {spec!r}: {e}") from None


def _check_device(device: str) -> None:
    """``auto`` or a device string torch reads (cpu, cuda, cuda:1, ...)."""
    if device != "auto":
        import torch

        try:
            torch.device(device)
        except RuntimeError:
            raise ConfigError(f"device = {device!r}: must be auto, cpu, cuda or cuda:N") from None


def _default_likelihood(model: str) -> str:
    """The ``likelihood`` default of a built-in model's constructor (a user's class: bernoulli,
    without importing it)."""
    from pyro_vae.models import MODELS

    if model in MODELS:
        param = inspect.signature(MODELS.get(model)).parameters.get("likelihood")
        if param is not None and isinstance(param.default, str):
            return param.default
    return "bernoulli"


def build_model_and_guide(config: TrainConfig, train_mean=None):
    """Instantiate the configured model and guide (Pyro programs, as ``nn.Module``s).

    Built-ins and users' classes receive, of ``x_dim, z_dim, hidden, activation, net,
    image_shape, num_classes`` (models also ``likelihood`` and ``train_mean``, the training mean
    for the output bias or None; guides ``model`` where they ask for it), the keywords their
    constructor names, plus their ``model_options``/``guide_options``. See ``pyro_vae.programs``
    for functions, methods and Pyro-example classes with ``model``/``guide`` methods.
    """
    if config.x_dim is None:
        raise ConfigError("config.x_dim is unset: set it from the data (dataset.x_dim) first")
    offered = dict(x_dim=config.x_dim, z_dim=config.z_dim, hidden=list(config.hidden),
                   activation=config.activation, likelihood=config.likelihood,
                   train_mean=train_mean if config.init_output_bias else None, net=config.net,
                   image_shape=tuple(config.image_shape) if config.image_shape else None,
                   num_classes=config.num_classes)
    from pyro_vae.guides import GUIDES
    from pyro_vae.models import MODELS
    from pyro_vae.programs import build_programs

    model, guide = build_programs(config.model, config.guide, offered, dict(config.model_options),
                                  dict(config.guide_options), MODELS, GUIDES)
    missing = set(getattr(model, "context_keys", ()) or ()) - set(getattr(guide, "context_keys", ()) or ())
    if missing and not getattr(model, "enumerated_sites", ()) and config.guide in GUIDES:
        raise ConfigError(f"model {config.model!r} is conditioned on {sorted(missing)}, but guide "
                         f"{config.guide!r} ignores it; use --guide conditional (q(z|x,y)).")
    return model, guide


def check_settings(given: dict) -> None:
    """Each key of ``given`` (a config file's) is a setting and its value allowed, on its own."""
    declared = declarations(TrainConfig)
    for key, value in given.items():
        if key not in declared:
            close = difflib.get_close_matches(key, declared, 1)
            raise ConfigError(f"unknown key {key!r}{f' (did you mean {close[0]!r}?)' if close else ''}; the keys "
                              f"are the flags' names: {', '.join(declared)}")
        declared[key].check(key, value)


def resumable_flags() -> list[str]:
    """The flags of the settings a ``--resume`` may change."""
    return [flag_name(name) for name, spec in declarations(TrainConfig).items() if spec.resumable]


def check_resume(saved: TrainConfig, config: TrainConfig, run_dir) -> None:
    """Refuse a resume whose ``config`` differs from the run's ``saved`` one in a setting that
    defines the model or the data (every setting but the resumable ones), by name."""
    for name, spec in declarations(TrainConfig).items():
        if spec.resumable or not spec.flag:
            continue
        was, now, flag = getattr(saved, name), getattr(config, name), flag_name(name, spec)
        if was != now and not (name == "image_shape" and now is None):  # None: the data's own shape
            raise ConfigError(f"{flag} cannot change on --resume: it defines the run's model or data ({run_dir} has "
                              f"{name} = {was!r}, given {now!r}); start a new run with --out, or leave out {flag}. "
                              f"Only {', '.join(resumable_flags())} may change")
