"""pyro-vae: variational autoencoders as Pyro programs.

The Python API in one import::

    import pyro_vae
    config = pyro_vae.TrainConfig(model="mypkg.vae:VAE", guide="mypkg.vae:VAE", epochs=10)
    pyro_vae.train(config, "runs/mine")                      # a run directory
    pyro_vae.train(config, "runs/logged", callbacks=[MyLogger()])  # a pyro_vae.Callback subclass
    config, model, guide = pyro_vae.load_run("runs/mine", trust_code=True)  # it names mypkg's code
    pyro_vae.evaluate(model, guide, x, k=1000)["test_log_likelihood"]
    objective = pyro_vae.Objective(model, guide, pyro_vae.make_estimator("iwae:K=5"))
    vae = pyro_vae.LatentCodec.from_run("runs/mine")  # diffusers' verbs: vae.encode(x).latent_dist, vae.decode(z).sample

Names are imported on first use, so ``import pyro_vae`` stays cheap.
"""

__version__ = "0.1.0"

_API = {
    "train": "pyro_vae.training",
    "Callback": "pyro_vae.callbacks",
    "TrainingState": "pyro_vae.callbacks",
    "TrainConfig": "pyro_vae.config",
    "load_run": "pyro_vae.run",
    "evaluate": "pyro_vae.evaluation",
    "evaluate_run": "pyro_vae.evaluation",
    "make_estimator": "pyro_vae.objectives",
    "Objective": "pyro_vae.objectives",
    "disentangle_run": "pyro_vae.applications",
    "LatentCodec": "pyro_vae.latents",
}

__all__ = ["__version__", *_API]


def __getattr__(name):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pyro_vae' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
