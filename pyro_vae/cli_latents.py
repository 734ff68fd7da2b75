"""The latent subcommands of ``pyro-vae``: ``encode``, ``decode``, ``prior`` and ``sample --prior``
(thin: parse, call ``pyro_vae.latents`` / ``pyro_vae.second_stage``, print)."""

from __future__ import annotations

import time
from pathlib import Path

from pyro_vae.errors import ConfigError


def _figure(config, data, x, out: Path, arrays: Path, title: str, label: str) -> list:
    """An image grid of x (images), or a scatter of pairs of features over the test points;
    x in the data's own units is also written to ``arrays`` (.npy)."""
    from pyro_vae.applications import data_units, is_image, save_arrays
    from pyro_vae.plots import save_image_grid, save_pairs

    written = [save_arrays(arrays, data_units(data, x))]
    if is_image(config, x.shape[-1]):
        written.append(save_image_grid(x[:64], out, config.image_shape, title=title))
    else:
        written.append(save_pairs(out, data_units(data, data.test), {label: data_units(data, x)}, title=title))
    return written


def cmd_encode(args) -> int:
    from pyro_vae.latents import encode_run, save_latents

    latents = encode_run(args.run, args.data, args.seed, args.device, args.best, args.trust_code)
    path = save_latents(latents, args.out or Path(args.run) / "latents.pt")
    if latents["kind"] == "codes":  # a VQ-VAE
        rows = ", ".join(f"{name} {len(latents[name]['codes'])}" for name in ("train", "test", "data") if name in latents)
        print(f"code indices of {rows} rows, grids of shape {tuple(latents['shape'])} over {latents['num_codes']} codes")
        print(f"written: {path} (torch.load(path, weights_only=True))")
        return 0
    rows = ", ".join(f"{name} {len(latents[name]['mean'])}" for name in ("train", "test", "data") if name in latents)
    scales = "closed-form" if latents["exact"] else "from draws (the guide is not a diagonal Gaussian)"
    print(f"q(z|x) means and scales of {rows} rows, latents of shape {tuple(latents['shape'])} "
          f"(sites {', '.join(latents['sites'])}); scales {scales}")
    print(f"scaling_factor {latents['scaling_factor']:.5f} (1 / sd of the training latents); per-dimension "
          f"sd {float(latents['latent_std'].min()):.3f} to {float(latents['latent_std'].max()):.3f}")
    print(f"written: {path} (torch.load(path, weights_only=True))")
    return 0


def _scaling_factor(args, given) -> float:
    """The factor that scaled latents were multiplied by: --scaling-factor, else RUN/latents.pt's."""
    from pyro_vae.latents import read_latents

    if args.scaling_factor is not None:
        return args.scaling_factor
    if isinstance(given, dict):
        raise ConfigError(f"{args.latents} holds the unscaled means of `pyro-vae encode`: leave out --scaled")
    stored = Path(args.run) / "latents.pt"
    if not stored.exists():
        raise ConfigError(f"--scaled needs the run's scaling factor: run `pyro-vae encode {args.run}` first "
                         f"(writes {stored}) or pass --scaling-factor F")
    return read_latents(stored)["scaling_factor"]


def cmd_decode(args) -> int:
    from pyro_vae.applications import open_run
    from pyro_vae.data import load_run_data
    from pyro_vae.latents import decode, latent_layout, read_latents

    config, model, guide, device = open_run(args.run, args.device, args.seed, args.best, args.trust_code)
    data = load_run_data(config, device, test_size=None)
    if _takes_context(model, guide):
        raise ConfigError("decode reads latents alone, and this run's model also takes labels as context")
    given = read_latents(args.latents)
    if isinstance(given, dict):
        if args.split not in given:
            raise ConfigError(f"{args.latents} has no {args.split!r} split; it has "
                             f"{', '.join(k for k in ('train', 'test', 'data') if k in given)}")
        z = given[args.split]["codes" if given.get("kind") == "codes" else "mean"]
    else:
        z = given
    layout = latent_layout(model, guide, data.test)
    if z.dim() < 2:
        raise ConfigError(f"{args.latents} holds a tensor of shape {tuple(z.shape)}: give latents with rows first, "
                         f"(N, {', '.join(map(str, layout.shape))})")
    layout.check(z, str(args.latents))
    if args.scaled:
        z = z / _scaling_factor(args, given)
    x = decode(model, z.to(device), data.test, layout).sample
    out = Path(args.out or Path(args.run) / "figures" / "decoded.png")
    written = _figure(config, data, x, out, Path(args.run) / "decoded.npy",
                      f"{len(x)} latents of {Path(args.latents).name} decoded, E[x | z]", "E[x | z]")
    print(f"decoded {len(x)} latents{' (scaled)' if args.scaled else ''}")
    print("written:", " ".join(map(str, written)))
    return 0


def _takes_context(model, guide) -> bool:
    from pyro_vae.programs import context_keys

    return bool(context_keys(model, guide))


PRIOR_OPTIONS = {
    # flag: (kinds, type, help)
    "components": (("gmm",), int, "mixture components (default 10)"),
    "train_steps": (("diffusion", "pixelcnn"), int, "training steps, batches of fresh draws z ~ q(z|x) (default 10000)"),
    "batch_size": (("diffusion", "pixelcnn"), int, "latents per training step (default 512)"),
    "hidden": (("diffusion", "pixelcnn"), int, "width of the MLP (vector latents) or channels of the U-Net (grids) (default 256)"),
    "blocks": (("diffusion", "pixelcnn"), int, "residual blocks of the MLP (default 3)"),
    "lr": (("diffusion", "pixelcnn"), float, "AdamW learning rate, cosine-decayed to 0 (default 1e-3)"),
}


def cmd_prior(args) -> int:
    from pyro_vae.second_stage import LATENT_PRIORS, fit_prior_run

    options = {k: getattr(args, k) for k, (kinds, _, _) in PRIOR_OPTIONS.items() if getattr(args, k) is not None}
    for key in options:
        if args.kind not in PRIOR_OPTIONS[key][0]:
            raise ConfigError(f"--{key.replace('_', '-')} is an option of --kind {PRIOR_OPTIONS[key][0][0]}, not {args.kind}")
    t0 = time.perf_counter()
    r = fit_prior_run(args.run, args.kind, options, args.seed, args.device, args.best, args.trust_code,
                      progress=not args.quiet)
    details = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                        if k not in ("path", "seconds", "scaling_factor"))
    what = ("training code grids" if getattr(LATENT_PRIORS.get(args.kind), "takes_codes", False) else
            f"scaled training latents (scaling_factor {r['scaling_factor']:.5f})")
    print(f"{args.kind} prior fitted to {r['latents']} {what} in {time.perf_counter() - t0:.0f} s: {details}")
    print(f"written: {r['path']} (sample with `pyro-vae sample {args.run} --prior {args.kind}`)")
    return 0


def cmd_sample_prior(args) -> int:
    """`pyro-vae sample RUN --prior KIND`: latents from a second stage, decoded."""
    from pyro_vae.applications import open_run
    from pyro_vae.data import load_run_data
    from pyro_vae.latents import LatentLayout, decode
    from pyro_vae.second_stage import open_prior, sample_latents

    if args.label is not None:
        raise ConfigError("--label draws from a class-conditional model's own prior; a second stage is unconditional")
    config, model, guide, device = open_run(args.run, args.device, args.seed, args.best, args.trust_code)
    prior, record = open_prior(args.run, args.prior, device, args.best)
    data = load_run_data(config, device, test_size=None if not config.image_shape else 1)
    options = {"steps": args.denoising_steps, "eta": args.eta} if args.prior == "diffusion" else {}
    t0 = time.perf_counter()
    z = sample_latents(prior, record, args.n, args.seed, **options)
    seconds = time.perf_counter() - t0
    x = decode(model, z, data.test, LatentLayout(record["latents"]["sites"])).sample
    stem = f"samples-{args.prior}"
    out = Path(args.out or Path(args.run) / "figures" / f"{stem}.png")
    written = _figure(config, data, x, out, Path(args.run) / f"{stem}.npy",
                      f"{args.n} samples through the {args.prior} prior", f"{args.prior} prior")
    print(f"{args.n} latents from the {args.prior} prior in {seconds:.1f} s, decoded")
    print("written:", " ".join(map(str, written)))
    return 0


def add_latent_commands(sub, run_parser) -> None:
    """The ``encode``, ``decode`` and ``prior`` subcommands (``run_parser`` adds RUN, --device,
    --seed, --best and --trust-code)."""
    from pyro_vae.cli import POSITIVE, checked

    e = run_parser("encode", "q(z|x) of every training and test row (means, scales, labels) with scaling_factor "
                   "and per-dimension mean and sd, for downstream models; writes RUN/latents.pt", cmd_encode)
    e.add_argument("--data", help="also encode the points of this .npy/.pt file (split 'data')")
    e.add_argument("--out", help="latents file (default RUN/latents.pt)")
    d = run_parser("decode", "latents back into data E[x | z]: RUN/decoded.npy and a figure", cmd_decode)
    d.add_argument("latents", help="a file of `pyro-vae encode`, or a tensor (.pt, .npy) of latents, rows first")
    d.add_argument("--scaled", action="store_true",
                   help="the latents are multiplied by scaling_factor (as a diffusion model sees them): divide first")
    d.add_argument("--scaling-factor", type=checked(float, above=0), help="with --scaled: the factor (default RUN/latents.pt's)")
    d.add_argument("--split", default="test", help="which split of an encode file to decode (train, test, data)")
    d.add_argument("--out", help="PNG path (default RUN/figures/decoded.png)")
    p = run_parser("prior", "fit a second-stage prior to the run's scaled training latents; writes RUN/priors/KIND.pt",
                   cmd_prior)
    p.add_argument("--kind", required=True,  # no choices: the registry is read when the command runs (fast --help)
                   help="diffusion (DDPM, cosine schedule, epsilon prediction) or gmm (Gaussian mixture, EM); "
                        "pixelcnn for a VQ-VAE's codes (masked-convolution autoregressive prior)")
    for key, (kinds, typ, help_) in PRIOR_OPTIONS.items():
        check = checked(float, above=0) if typ is float else POSITIVE
        p.add_argument("--" + key.replace("_", "-"), type=check, help=f"{'/'.join(kinds)}: {help_}")
    p.add_argument("--quiet", action="store_true")


def add_sample_prior_flags(s) -> None:
    """``sample``'s flags for a second stage."""
    s.add_argument("--prior", help="draw the latents from this second stage of the run (`pyro-vae prior RUN --kind "
                                   "KIND` fits it): diffusion, gmm, pixelcnn (VQ-VAE)")
    from pyro_vae.cli import POSITIVE, checked

    s.add_argument("--denoising-steps", type=POSITIVE, default=50, help="with --prior diffusion: sampling steps")
    s.add_argument("--eta", type=checked(float, at_least=0), default=0.0,
                   help="with --prior diffusion: 0 deterministic DDIM (the default), 1 ancestral DDPM sampling")
