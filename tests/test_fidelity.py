"""The fidelity check on real MNIST: a small classifier labels class-conditioned cvae samples
with the requested class far more often than chance."""

import torch

from pyro_vae.classifier import class_fidelity, train_classifier
from pyro_vae.config import TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.run import load_run
from pyro_vae.training import accuracy, train


def test_classifier_labels_cvae_samples_with_their_class(tmp_path):
    grey = load_dataset("mnist", "cpu", train_size=3000, test_size=1000)
    classifier = train_classifier(grey, epochs=2)
    assert accuracy(classifier, grey.test, grey.test_labels) > 0.8  # 3,000 images, two passes

    data = load_dataset("binarized-mnist", "cpu", train_size=10000, test_size=100)
    config = TrainConfig.from_dict(dict(model="cvae", guide="conditional", z_dim=20, hidden=[400, 400],
                                        epochs=2, seed=0, device="cpu"))
    train(config, tmp_path / "run", quiet=True, dataset=data)
    _, model, _ = load_run(tmp_path / "run")
    torch.manual_seed(0)
    frac = class_fidelity(model, classifier, 10, n=50)
    assert frac.shape == (10,)
    assert frac.mean() > 0.6  # chance is 0.1; 0.89 here; the full example reaches 0.94 (benchmarks/results/vae-family.md)
    # the label matters: samples drawn for class c are not labelled c+1 as often
    torch.manual_seed(0)
    shifted = torch.stack([(classifier.classify(model.sample(50, y=c)) == (c + 1) % 10).float().mean()
                           for c in range(10)])
    assert frac.mean() > 3 * shifted.mean()
