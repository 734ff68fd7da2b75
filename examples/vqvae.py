"""The VQ-VAE on binarized MNIST (van den Oord et al. 2017), as issue 17 asks to measure it:

- codebook usage (fraction of the 512 codes used over an epoch) and perplexity, with and without
  dead-code restarts;
- test reconstruction -log p(x|z) beside a Gaussian VAE with the same conv stacks (``--net conv``:
  the same two stride-2 convolutions, 32 and 64 channels, with a dense bottleneck of ``--z-dim``);
- the bound on -log p(x) in nats and bits/dim: the VQ-VAE's with the uniform prior over codes and
  with a PixelCNN fitted to its training codes (``pyro-vae prior RUN --kind pixelcnn``), beside the
  VAE's importance-sampled log-likelihood (k = ``--k``) and its ELBO.

    python examples/vqvae.py [--epochs 5] [--train-size 10000] [--pixelcnn-steps 1500] [--k 100]

Prints a markdown table (and writes it to OUT/vqvae.md).
"""

import argparse
import json
import time
from pathlib import Path

from pyro_vae.config import TrainConfig
from pyro_vae.evaluation import evaluate_run
from pyro_vae.run import holds_run
from pyro_vae.second_stage import fit_prior_run
from pyro_vae.training import train

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--out", default="runs/example-vqvae", help="folder of the runs")
p.add_argument("--epochs", type=int, default=5)
p.add_argument("--train-size", type=int, default=10000)
p.add_argument("--test-size", type=int, default=10000)
p.add_argument("--num-codes", type=int, default=512)
p.add_argument("--z-dim", type=int, default=32, help="the Gaussian VAE's latent dimensions")
p.add_argument("--pixelcnn-steps", type=int, default=1500)
p.add_argument("--k", type=int, default=100, help="importance samples for the VAE's log p(x)")
args = p.parse_args()

out = Path(args.out)
common = dict(dataset="binarized-mnist", epochs=args.epochs, train_size=args.train_size, test_size=args.test_size,
              seed=0, estimator="elbo")
runs = {
    "vqvae (restarts)": dict(model="vqvae", guide="vqvae", model_options={"num_codes": args.num_codes}),
    "vqvae (no restarts)": dict(model="vqvae", guide="vqvae",
                                model_options={"num_codes": args.num_codes, "restart_threshold": 0.0}),
    "gaussian vae (conv)": dict(model="vae", guide="gaussian", net="conv", z_dim=args.z_dim, hidden=[256]),
}
rows = {}
for name, options in runs.items():
    run = out / name.split(" (")[0].replace(" ", "-") / (name.split("(")[1].rstrip(")").replace(" ", "-"))
    t0 = time.perf_counter()
    if not holds_run(run):
        print(f"training {run} ...", flush=True)
        train(TrainConfig.from_dict({**common, **options}), run, quiet=True)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    seconds = sum(m["epoch_time_s"] for m in metrics)
    if options["model"] == "vqvae":
        fit_prior_run(run, "pixelcnn", {"train_steps": args.pixelcnn_steps}, device="cpu")
        r = evaluate_run(run, device="cpu")
        rows[name] = dict(usage=" / ".join(f"{m['codebook_usage']:.3f}" for m in metrics),
                          perplexity=f"{metrics[-1]['perplexity']:.0f}",
                          restarts=sum(m["codebook_restarts"] for m in metrics),
                          recon=f"{r['test_reconstruction_nll']:.2f}",
                          bound=f"{r['test_nll_bound_uniform']:.1f} ({r['test_bits_per_dim_bound_uniform']:.4f})",
                          learned=f"{r['test_nll_bound_pixelcnn']:.1f} ({r['test_bits_per_dim_bound_pixelcnn']:.4f})",
                          seconds=f"{seconds:.0f}")
    else:
        r = evaluate_run(run, k=args.k, device="cpu", export_points=(), figures=False)
        rows[name] = dict(usage="-", perplexity="-", restarts="-", recon=f"{r['distortion']:.2f}",
                          bound=f"{-r['test_elbo']:.1f} (ELBO)",
                          learned=f"{r['test_nll']:.1f} ({r['test_bits_per_dim']:.4f}) (IS, k={args.k})",
                          seconds=f"{seconds:.0f}")
    print(name, rows[name], flush=True)

head = ("| run | codebook usage per epoch | perplexity (last epoch) | restarts | test -log p(x\\|z) | "
        "bound, uniform prior (bits/dim) | bound, learned prior (bits/dim) | train s |")
lines = [head, "|" + "---|" * 8]
for name, r in rows.items():
    lines.append(f"| {name} | {r['usage']} | {r['perplexity']} | {r['restarts']} | {r['recon']} | {r['bound']} | "
                 f"{r['learned']} | {r['seconds']} |")
table = "\n".join(lines)
print(table)
(out / "vqvae.md").write_text(table + "\n")
