"""A small image classifier p(y|x) trained on labels, to judge generated images: the fraction of
class-conditioned samples x ~ p(x|y=c) it labels c (a fidelity check for conditional models;
cf. the "classification accuracy score" of Ravuri & Vinyals 2019, turned around)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pyro_vae.data import Dataset
from pyro_vae.errors import DataError
from pyro_vae.nets import encoder_net


class Classifier(nn.Module):
    """logits = f(x) with the shared encoder bodies: ``net="conv"`` (two stride-2 convolutions,
    then an MLP; images of ``image_shape``) or ``"mlp"``. ``classify(x)`` gives the argmax class."""

    def __init__(self, x_dim: int, num_classes: int, hidden: Sequence[int] = (128,), activation: str = "relu",
                 net: str = "conv", image_shape: Sequence[int] | None = None):
        super().__init__()
        self.body = encoder_net(net, x_dim, num_classes, hidden, activation, image_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    @torch.no_grad()
    def classify(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        self.eval()
        return torch.cat([self(chunk).argmax(-1) for chunk in x.split(batch_size)])


def train_classifier(data: Dataset, epochs: int = 2, batch_size: int = 128, lr: float = 1e-3,
                     net: str = "conv", hidden: Sequence[int] = (128,), seed: int = 0) -> Classifier:
    """Fit a Classifier to ``data.train`` and its labels: minibatch Adam on the cross-entropy
    -log p(y|x), the batches reshuffled each epoch; returns it in eval mode."""
    if data.train_labels is None or not data.num_classes:
        raise DataError(f"a classifier needs labelled data; {data.name!r} has no labels")
    torch.manual_seed(seed)
    x, y = data.train, data.train_labels
    classifier = Classifier(data.x_dim, data.num_classes, hidden, net=net, image_shape=data.image_shape).to(x.device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    classifier.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(x), generator=order).to(x.device).split(batch_size):
            loss = nn.functional.cross_entropy(classifier(x[rows]), y[rows].long())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return classifier.eval()


@torch.no_grad()
def class_fidelity(model, classifier: Classifier, num_classes: int, n: int = 100, mean: bool = True) -> torch.Tensor:
    """Per class c, the fraction of n samples ``model.sample(n, y=c)`` (decoder means by
    default, as ``pyro-vae sample --label`` draws) that ``classifier`` labels c: a tensor (num_classes,)."""
    return torch.stack([(classifier.classify(model.sample(n, mean=mean, y=c)) == c).float().mean()
                        for c in range(num_classes)])


@torch.no_grad()
def classifier_features(classifier: Classifier, x: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, class probabilities) of the rows of x: the features are the input of the
    classifier's last linear layer (its penultimate activations, as Inception's pool features in
    FID), float64."""
    classifier.eval()
    last = [m for m in classifier.modules() if isinstance(m, nn.Linear)][-1]
    seen = []
    hook = last.register_forward_pre_hook(lambda _, args: seen.append(args[0].double()))
    try:
        probs = torch.cat([classifier(chunk).softmax(-1).double() for chunk in x.split(batch_size)])
    finally:
        hook.remove()
    return torch.cat(seen), probs


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Frechet distance between Gaussians fitted to two sets of features (rows),
    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2}) (Dowson & Landau 1982; FID, Heusel et
    al. 2017), with tr (S_a S_b)^{1/2} = sum_i sqrt(lambda_i(S_a^{1/2} S_b S_a^{1/2}))."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + s_a.trace() + s_b.trace() - 2 * cross)


@torch.no_grad()
def sample_quality(classifier: Classifier, samples: torch.Tensor, reference: torch.Tensor) -> dict:
    """How generated images look to a classifier: the Frechet distance between their features
    and ``reference``'s (``frechet_distance``; lower is closer), the mean confidence max_c p(c|x)
    (higher: more recognizable digits) and the histogram of predicted classes (shares summing to 1)."""
    f_samples, probs = classifier_features(classifier, samples)
    f_reference, _ = classifier_features(classifier, reference)
    classes = probs.argmax(-1)
    histogram = torch.bincount(classes, minlength=probs.shape[-1]).double() / len(classes)
    return {"frechet_distance": frechet_distance(f_samples, f_reference),
            "mean_confidence": float(probs.max(-1).values.mean()),
            "class_histogram": [round(float(h), 4) for h in histogram]}
