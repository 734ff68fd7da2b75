"""Does a learned prior on a VAE's latents give better samples than N(0, I)? (Dai & Wipf 2019's
two-stage claim, with a diffusion model as the second stage as in Rombach et al. 2022.)

Trains (or reuses) an iwae1 VAE and a VampPrior VAE of the same architecture on binarized MNIST,
fits the two second stages to the VAE's scaled training latents (``pyro-vae prior RUN --kind
gmm`` and ``--kind diffusion``), draws n samples (decoder means) from each prior and scores them
against the MNIST test set with the project's classifier (``pyro_vae.classifier.sample_quality``):
the Frechet distance of its penultimate features (lower is better), its mean confidence and the
class histogram. The training images and the test reconstructions are scored too, as floors.

    python examples/latent_diffusion.py [--epochs 30] [--train-steps 20000] [--n 10000]
"""

import argparse
import time
from pathlib import Path

import torch

from pyro_vae.applications import prior_samples, reconstruct
from pyro_vae.classifier import Classifier, sample_quality, train_classifier
from pyro_vae.config import TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.latents import decode
from pyro_vae.plots import save_image_grid
from pyro_vae.run import holds_run, load_run
from pyro_vae.second_stage import fit_prior_run, open_prior, sample_latents
from pyro_vae.training import accuracy, train

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--out", default="runs/example-latent-diffusion", help="folder of the two runs")
p.add_argument("--epochs", type=int, default=30, help="VAE training epochs (where a run is not there yet)")
p.add_argument("--train-steps", type=int, default=10000, help="diffusion training steps (batches of 512)")
p.add_argument("--hidden", type=int, default=256, help="width of the diffusion MLP")
p.add_argument("--sample-steps", type=int, default=50, help="denoising steps of the DDIM sampler (eta=0)")
p.add_argument("--ddpm-steps", type=int, default=100, help="denoising steps of the ancestral DDPM sampler (eta=1)")
p.add_argument("--components", type=int, default=10, help="GMM components")
p.add_argument("--n", type=int, default=10000, help="samples per prior")
p.add_argument("--classifier-epochs", type=int, default=2)
p.add_argument("--refit", action="store_true", help="fit the second stages again even where the run has them")
args = p.parse_args()
torch.manual_seed(0)

out = Path(args.out)
runs = {"vae": out / "vae", "vamp": out / "vamp"}
for name, run in runs.items():
    if not holds_run(run):
        print(f"training {run} ({args.epochs} epochs) ...", flush=True)
        train(TrainConfig.from_dict(dict(preset="iwae1", model=name, dataset="binarized-mnist", epochs=args.epochs,
                                         seed=0)), run, quiet=True)

grey = load_dataset("mnist", "cpu")
t0 = time.perf_counter()
saved = out / f"classifier-{args.classifier_epochs}epochs.pt"
if saved.exists():  # the classifier of an earlier call (seeded: the same weights)
    classifier = Classifier(grey.x_dim, grey.num_classes, image_shape=grey.image_shape)
    classifier.load_state_dict(torch.load(saved, weights_only=True))
    classifier.eval()
else:
    classifier = train_classifier(grey, epochs=args.classifier_epochs)
    torch.save(classifier.state_dict(), saved)
print(f"classifier: test accuracy {accuracy(classifier, grey.test, grey.test_labels):.4f} "
      f"({args.classifier_epochs} epochs, {time.perf_counter() - t0:.0f} s; {saved})")

vae = runs["vae"]
fitted = {}
for kind, options in (("gmm", {"components": args.components}),
                      ("diffusion", {"train_steps": args.train_steps, "hidden": args.hidden})):
    path = vae / "priors" / f"{kind}.pt"
    if args.refit or not path.exists():
        t0 = time.perf_counter()
        info = fit_prior_run(vae, kind, options, device="cpu", progress=True)
        print(f"{kind}: fitted in {time.perf_counter() - t0:.0f} s -> {info['path']}", flush=True)
    fitted[kind] = open_prior(vae, kind)

_, model, guide = load_run(vae)
_, vamp, _ = load_run(runs["vamp"])
like = grey.test[:1]
rows, samples = [], {}


def timed(name, draw):
    t = time.perf_counter()
    x = draw()
    samples[name] = (x, time.perf_counter() - t)


torch.manual_seed(0)
timed("N(0, I) prior", lambda: prior_samples(model, args.n, like))
timed(f"GMM prior (K={args.components})", lambda: decode(model, sample_latents(*fitted["gmm"], args.n), like).sample)
timed(f"diffusion prior (DDIM, {args.sample_steps} steps)",
      lambda: decode(model, sample_latents(*fitted["diffusion"], args.n, steps=args.sample_steps), like).sample)
timed(f"diffusion prior (DDPM, {args.ddpm_steps} steps)",
      lambda: decode(model, sample_latents(*fitted["diffusion"], args.n, steps=args.ddpm_steps, eta=1.0), like).sample)
timed("VampPrior model (vamp)", lambda: prior_samples(vamp, args.n, like))
t = time.perf_counter()
diffusion_latents = sample_latents(*fitted["diffusion"], args.n, steps=args.sample_steps)
latent_seconds = time.perf_counter() - t
binary_test = load_dataset("binarized-mnist", "cpu").test
timed("(test reconstructions)", lambda: reconstruct(model, guide, binary_test[: args.n]))
samples["(training images)"] = (grey.train[: args.n], 0.0)

print(f"\n{args.n} samples each (decoder means), scored against the {len(grey.test)} MNIST test images")
print(f"{'samples':<38} {'FD':>7} {'conf.':>6} {'s':>6}  class histogram (0..9, %)")
for name, (x, seconds) in samples.items():
    q = sample_quality(classifier, x, grey.test)
    hist = " ".join(f"{100 * h:4.1f}" for h in q["class_histogram"])
    print(f"{name:<38} {q['frechet_distance']:7.2f} {q['mean_confidence']:6.3f} {seconds:6.1f}  {hist}")
    rows.append((name, q))
fd = {name: q["frechet_distance"] for name, q in rows}
base = fd["N(0, I) prior"]
for name in fd:
    if name.startswith(("GMM", "diffusion", "Vamp")):
        print(f"{name}: FD {fd[name]:.2f} = {fd[name] / base:.2f} x the N(0, I) prior's ({base:.2f})")
print(f"diffusion sampling of {args.n} latents (DDIM, {args.sample_steps} steps): {latent_seconds:.1f} s "
      f"({torch.get_num_threads()} threads)")
figure = vae / "figures" / "samples-by-prior.png"
grid = torch.cat([x[:16] for name, (x, _) in samples.items() if not name.startswith("(")])
print(save_image_grid(grid, figure, (1, 28, 28), nrow=16,
                      title="rows: N(0, I), GMM, diffusion (DDIM), diffusion (DDPM), VampPrior model"))
