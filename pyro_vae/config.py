"""Training configuration, architecture presets, and building a model/guide pair from them."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import tomllib
import torch

from pyro_vae.guides import GUIDES
from pyro_vae.likelihoods import BERNOULLI_FAMILY
from pyro_vae.models import MODELS
from pyro_vae.programs import build_programs

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


@dataclass
class TrainConfig:
    """Everything needed to repeat a run (and rebuild its model); saved as config.json."""

    # data
    dataset: str = "binarized-mnist"
    data_dir: str | None = None
    validation: int = 0
    train_size: int | None = None
    test_size: int | None = None
    image_size: int | None = None
    labels: int | None = None
    labelled_every: int = 0
    classes: list[int] | None = None
    standardize: bool = False
    # model and guide
    preset: str | None = None
    model: str = "vae"
    guide: str = "gaussian"
    z_dim: int = 20
    hidden: list[int] = field(default_factory=lambda: [400])
    activation: str = "relu"
    likelihood: str | None = None  # None: the model's own default (bernoulli; gaussian for linear)
    net: str = "mlp"
    init_output_bias: bool = False
    model_options: dict = field(default_factory=dict)
    guide_options: dict = field(default_factory=dict)
    # objective
    estimator: str = "meanfield"
    particles: int = 1
    beta: float = 1.0
    warmup_epochs: int = 0
    cycle_epochs: float = 0
    cycle_ratio: float = 0.5
    capacity: float | None = None
    capacity_epochs: float = 0
    gamma: float = 1000.0
    free_bits: float = 0.0
    # optimisation
    epochs: int = 10
    early_stopping: int = 0
    batch_size: int = 100
    lr: float = 1e-3
    lr_decay: float = 1.0
    weight_decay: float = 0.0
    clip_grad: float | None = None
    seed: int = 0
    device: str = "auto"
    jit: bool = False
    amp: str | None = None
    tensorboard: bool = False
    # filled in from the data when training starts
    x_dim: int | None = None
    image_shape: list[int] | None = None  # or given (--image-shape C H W) for flat rows of C*H*W features
    num_classes: int | None = None
    standardization: dict | None = None  # with standardize: the training rows' mean and sd (see data.Standardization)
    kl_methods: dict | None = None  # meanfield: per latent site, "closed form" or "monte carlo (why)"

    def __post_init__(self):
        if self.likelihood is None:
            self.likelihood = _default_likelihood(self.model)
        if self.standardize and self.likelihood in BERNOULLI_FAMILY and self.model in MODELS:
            raise ValueError(f"--standardize makes the data real-valued, and the {self.likelihood} likelihood needs "
                             f"data in [0, 1]: drop --standardize, or use --likelihood gaussian (or laplace)")
        if self.image_shape is not None and (len(self.image_shape) != 3 or min(self.image_shape) < 1):
            raise ValueError(f"--image-shape takes three positive sizes C H W (e.g. 1 28 28), got "
                             f"{' '.join(map(str, self.image_shape))}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must lie in (0, 1] (the factor on the learning rate after each epoch; "
                             f"1 keeps it constant), got {self.lr_decay}")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = {k.replace("-", "_"): v for k, v in d.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {', '.join(sorted(known))}")
        preset = d.get("preset")
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
            d = {**PRESETS[preset], **d}
        return cls(**d)

    def lr_at(self, epoch: int) -> float:
        """The learning rate of ``epoch`` (from 1): lr * lr_decay ** (epoch - 1)."""
        return self.lr * self.lr_decay ** (epoch - 1)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> TrainConfig:
        with open(path, "rb") as f:
            d = tomllib.load(f)
        return cls.from_dict({**d, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _default_likelihood(model: str) -> str:
    """The ``likelihood`` default of a built-in model's constructor (a user's class: bernoulli,
    without importing it)."""
    if model in MODELS:
        param = inspect.signature(MODELS.get(model)).parameters.get("likelihood")
        if param is not None and isinstance(param.default, str):
            return param.default
    return "bernoulli"


def build_model_and_guide(config: TrainConfig, train_mean: torch.Tensor | None = None):
    """Instantiate the configured model and guide (Pyro programs, as ``nn.Module``s).

    Built-ins and users' classes receive, of ``x_dim, z_dim, hidden, activation, net,
    image_shape, num_classes`` (models also ``likelihood`` and ``train_mean``, the training mean
    for the output bias or None; guides ``model`` where they ask for it), the keywords their
    constructor names, plus their ``model_options``/``guide_options``. See ``pyro_vae.programs``
    for functions, methods and Pyro-example classes with ``model``/``guide`` methods.
    """
    if config.x_dim is None:
        raise ValueError("config.x_dim is unset: set it from the data (dataset.x_dim) first")
    offered = dict(x_dim=config.x_dim, z_dim=config.z_dim, hidden=list(config.hidden),
                   activation=config.activation, likelihood=config.likelihood,
                   train_mean=train_mean if config.init_output_bias else None, net=config.net,
                   image_shape=tuple(config.image_shape) if config.image_shape else None,
                   num_classes=config.num_classes)
    model, guide = build_programs(config.model, config.guide, offered, dict(config.model_options),
                                  dict(config.guide_options), MODELS, GUIDES)
    missing = set(getattr(model, "context_keys", ()) or ()) - set(getattr(guide, "context_keys", ()) or ())
    if missing and not getattr(model, "enumerated_sites", ()) and config.guide in GUIDES:
        raise ValueError(f"model {config.model!r} is conditioned on {sorted(missing)}, but guide "
                         f"{config.guide!r} ignores it; use --guide conditional (q(z|x,y)).")
    return model, guide
