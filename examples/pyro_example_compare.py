"""Pyro's own VAE example pair, trained from Python with three ELBO estimators and compared.

The pair (``examples/pyro_example_vae.py``) is Pyro's examples/vae/vae.py as its users write it:
a module with ``model`` and ``guide`` methods, ``pyro.module``, sites "latent" and "obs". It is
named by import path; nothing in it was written for pyro-vae. Each estimator trains from the same
seed, then the test set is scored with the same importance-sampled log p(x) (k particles)::

    python examples/pyro_example_compare.py --epochs 5 --train-size 60000 --test-size 1000 --k 1000
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pyro_example_vae, by import path

import pyro_vae  # noqa: E402
from pyro_vae.data import load_run_data  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--estimators", nargs="+", default=["elbo", "meanfield", "iwae:K=5"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--k", type=int, default=500, help="importance samples per test point")
    p.add_argument("--out", default="runs/pyro-example")
    args = p.parse_args(argv)

    rows = []
    for spec in args.estimators:
        run = Path(args.out) / spec.replace(":", "_").replace("=", "")
        config = pyro_vae.TrainConfig(
            model="pyro_example_vae:VAE", guide="pyro_example_vae:VAE", model_options={"hidden_dim": 400},
            z_dim=50, estimator=spec, epochs=args.epochs, train_size=args.train_size,
            test_size=args.test_size, batch_size=100, lr=1e-3, seed=0)
        t0 = time.perf_counter()
        metrics = pyro_vae.train(config, run, quiet=True, overwrite=True)
        seconds = (time.perf_counter() - t0) / args.epochs
        config, model, guide = pyro_vae.load_run(run, trust_code=True)  # our own config, just trained
        x = load_run_data(config, "cpu").test
        r = pyro_vae.evaluate(model, guide, x, k=args.k, psis=False)
        rows.append((spec, metrics[-1]["test_loss"], r["test_elbo"], r["test_log_likelihood"], seconds))
        print(f"{spec}: done ({seconds:.1f} s/epoch)", file=sys.stderr)

    print(f"Pyro's VAE example (784-400-50, softplus), {args.epochs} epochs on {args.train_size} "
          f"binarized MNIST images; test set {args.test_size} images")
    print(f"{'estimator':<12} {'test bound':>11} {'test ELBO':>10} {'log p(x), k=' + str(args.k):>16} {'s/epoch':>8}")
    for spec, bound, elbo, ll, sec in rows:
        print(f"{spec:<12} {-bound:11.2f} {elbo:10.2f} {ll:16.2f} {sec:8.1f}")


if __name__ == "__main__":
    main()
