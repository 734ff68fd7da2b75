"""Disentanglement metrics: pure functions of codes (n, D) and ground-truth factors (n, F).

``codes`` are the representations (E_q[z|x] of a VAE); ``factors`` the class ids of the
generative factors of the same rows (dSprites: shape, scale, orientation, pos_x, pos_y). The
definitions follow disentanglement_lib (Locatello et al. 2019), sample counts included:

- ``mig``: mutual information gap (Chen et al. 2018): codes discretized into 20 equal-width
  bins, I(c_j; v_k) from the contingency table, and for each factor the gap between the two
  codes that share most information with it, over H(v_k), averaged over factors.
- ``beta_vae_score`` (Higgins et al. 2017): batches of 64 pairs that share one factor's value; the
  feature is the mean |c(x1) - c(x2)|; the score is the held-out accuracy of a linear classifier
  telling which factor was shared.
- ``factor_vae_score`` (Kim & Mnih 2018): batches of 64 codes with one factor fixed, scaled by
  each code's spread over the data (codes with spread < 0.05 left out); the code of least
  variance votes for the factor; a majority-vote classifier maps codes to factors; its held-out
  accuracy.
- ``dci`` (Eastwood & Williams 2018): an importance matrix R (codes x factors); disentanglement
  is 1 - H_F(R_j.) per code, weighted by the code's share of importance; completeness 1 -
  H_D(R_.k) per factor, weighted likewise; informativeness the prediction accuracy.
- ``sap`` (Kumar et al. 2018): for each factor, the gap between the two codes that predict it
  best, one code at a time, by held-out balanced accuracy; averaged.

Where disentanglement_lib uses scikit-learn (gradient boosted trees for DCI, a linear SVM for
SAP, logistic regression for the beta-VAE score), this module uses one dependency-free model,
multinomial logistic regression on standardized codes (``applications.fit_logistic``, L-BFGS):
the DCI importance of code j for factor k is the spread (standard deviation over classes) of
its standardized weight, a linear importance as in Eastwood & Williams' lasso variant. A linear
read-out misses what trees catch (a factor coded non-monotonically, such as an angle on a
circle), so DCI informativeness is lower than with trees, and scores are comparable within
this module, near (not equal to) disentanglement_lib's.

Pools stand in for a simulator: where a metric needs observations that share a factor's value,
it draws them from the rows (codes, factors) given, grouped by that value, which is what
sampling the factor grid does when the rows are a uniform sample of the grid (as a dSprites
subset is).
"""

from __future__ import annotations

import numpy as np
import torch

BINS = 20


def _arrays(codes, factors):
    codes = np.asarray(codes.detach().cpu() if torch.is_tensor(codes) else codes, dtype=np.float64)
    factors = np.asarray(factors.detach().cpu() if torch.is_tensor(factors) else factors, dtype=np.int64)
    if codes.ndim != 2 or factors.ndim != 2 or len(codes) != len(factors):
        raise ValueError(f"codes (n, D) and factors (n, F) must have the same rows, got {codes.shape} and {factors.shape}")
    return codes, factors


def discretize(codes: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Each column into ``bins`` equal-width bins over its range: ids 0..bins-1 (disentanglement_lib's
    histogram discretizer)."""
    out = np.empty(codes.shape, dtype=np.int64)
    for j, column in enumerate(codes.T):
        edges = np.histogram(column, bins)[1]
        out[:, j] = np.digitize(column, edges[1:-1])
    return out


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """I(a; b) in nats of two discrete variables from their samples (the plug-in estimate)."""
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1.0)
    joint /= joint.sum()
    outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / outer[nz])).sum())


def entropy(a: np.ndarray) -> float:
    """H(a) in nats of a discrete variable from its samples."""
    return mutual_information(a, a)


def _split(n: int, num_train: int, num_test: int, rng: np.random.Generator):
    """Random disjoint train and test rows; fewer where n is smaller (a 2:1 split of n)."""
    perm = rng.permutation(n)
    if num_train + num_test > n:
        num_train = n * num_train // (num_train + num_test)
    return perm[:num_train], perm[num_train : num_train + num_test]


def mig(codes, factors, num_train: int = 10_000, bins: int = BINS, seed: int = 0) -> dict:
    """Mutual information gap (Chen et al. 2018) on ``num_train`` rows: mean over factors k of
    (I(c_(1); v_k) - I(c_(2); v_k)) / H(v_k), c_(1), c_(2) the codes most informative about v_k.
    Also the matrix I (codes x factors), used to label what each code captures."""
    codes, factors = _arrays(codes, factors)
    rows = np.random.default_rng(seed).permutation(len(codes))[:num_train]
    c, v = discretize(codes[rows], bins), factors[rows]
    mi = np.array([[mutual_information(c[:, j], v[:, k]) for k in range(v.shape[1])] for j in range(c.shape[1])])
    h = np.array([entropy(v[:, k]) for k in range(v.shape[1])])
    top = np.sort(mi, axis=0)[::-1]
    second = top[1] if len(top) > 1 else np.zeros_like(h)
    gaps = np.where(h > 0, (top[0] - second) / np.where(h > 0, h, 1.0), 0.0)
    return {"mig": float(gaps.mean()), "mig_per_factor": gaps.tolist(), "mutual_information": mi.tolist()}


def _fit(features, labels, classes=None, balanced=False):
    from pyro_vae.applications import fit_logistic

    return fit_logistic(torch.as_tensor(features), torch.as_tensor(labels), weight_decay=1e-4, max_iter=300,
                        classes=classes, balanced=balanced)


def dci(codes, factors, num_train: int = 10_000, num_test: int = 5_000, seed: int = 0) -> dict:
    """DCI (Eastwood & Williams 2018) with linear importances: R_jk = the standard deviation over
    classes of code j's standardized weight in a logistic regression predicting factor k (module
    docstring). disentanglement = sum_j rho_j (1 - H_F(P_j.)), P_j. = R_j. / sum_k R_jk, rho_j =
    sum_k R_jk / sum R; completeness = sum_k rho_k (1 - H_D(P_.k)); informativeness = the mean
    train and test accuracy over factors."""
    codes, factors = _arrays(codes, factors)
    tr, te = _split(len(codes), num_train, num_test, np.random.default_rng(seed))
    importance = np.zeros((codes.shape[1], factors.shape[1]))
    acc_train, acc_test = [], []
    for k in range(factors.shape[1]):
        classes = int(factors[:, k].max()) + 1
        fit = _fit(codes[tr], factors[tr, k], classes)
        importance[:, k] = fit.weight.std(1).cpu().numpy()
        acc_train.append(fit.accuracy(torch.as_tensor(codes[tr]), torch.as_tensor(factors[tr, k])))
        acc_test.append(fit.accuracy(torch.as_tensor(codes[te]), torch.as_tensor(factors[te, k])))
    return {"dci_disentanglement": _weighted_one_minus_entropy(importance),
            "dci_completeness": _weighted_one_minus_entropy(importance.T),
            "dci_informativeness_train": float(np.mean(acc_train)),
            "dci_informativeness_test": float(np.mean(acc_test)),
            "dci_importance": importance.tolist()}


def _weighted_one_minus_entropy(r: np.ndarray) -> float:
    """sum_i rho_i (1 - H(P_i.)/log m) over the rows i of a non-negative (n, m) matrix."""
    if r.shape[1] < 2 or r.sum() <= 0:
        return 0.0
    p = r / np.maximum(r.sum(1, keepdims=True), 1e-30)
    h = -(p * np.log(np.where(p > 0, p, 1.0))).sum(1) / np.log(r.shape[1])
    return float(((1.0 - h) * r.sum(1) / r.sum()).sum())


def sap(codes, factors, num_train: int = 10_000, num_test: int = 5_000, seed: int = 0) -> dict:
    """SAP (Kumar et al. 2018) for discrete factors: S_jk = held-out balanced accuracy of a
    classifier of factor k from code j alone (logistic regression, class-balanced, where
    disentanglement_lib has a linear SVM); the score is the mean over factors of the gap between
    the two largest S_jk."""
    codes, factors = _arrays(codes, factors)
    tr, te = _split(len(codes), num_train, num_test, np.random.default_rng(seed))
    score = np.zeros((codes.shape[1], factors.shape[1]))
    for k in range(factors.shape[1]):
        classes = int(factors[:, k].max()) + 1
        y_te = torch.as_tensor(factors[te, k])
        for j in range(codes.shape[1]):
            fit = _fit(codes[tr, j : j + 1], factors[tr, k], classes, balanced=True)
            score[j, k] = _balanced_accuracy(fit.predict(torch.as_tensor(codes[te, j : j + 1])), y_te)
    top = np.sort(score, axis=0)[::-1]
    gaps = top[0] - (top[1] if len(top) > 1 else 0.0)
    return {"sap": float(gaps.mean()), "sap_matrix": score.tolist()}


def _balanced_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    hits = [(predicted[labels == c] == c).double().mean() for c in labels.unique()]
    return float(torch.stack(hits).mean())


class _Groups:
    """Rows of a pool grouped by each factor's value: draw rows that share factor k's value v."""

    def __init__(self, factors: np.ndarray):
        self.order = [np.argsort(factors[:, k], kind="stable") for k in range(factors.shape[1])]
        self.sizes = [np.bincount(factors[:, k]) for k in range(factors.shape[1])]
        self.starts = [np.concatenate([[0], np.cumsum(s)[:-1]]) for s in self.sizes]

    def draw(self, k: int, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One random row with factor k = v for each v in ``values`` (rows of the same shape)."""
        offset = (rng.random(values.shape) * self.sizes[k][values]).astype(np.int64)
        return self.order[k][self.starts[k][values] + offset]


def beta_vae_score(codes, factors, batch_size: int = 64, num_train: int = 10_000, num_eval: int = 5_000,
                   seed: int = 0) -> dict:
    """beta-VAE score (Higgins et al. 2017): each point is a factor k drawn uniformly and a batch
    of pairs (x1, x2) that share factor k's value (one value per pair, the rest random); its
    feature the mean over the batch of |c(x1) - c(x2)|; the score is the accuracy, on
    ``num_eval`` fresh points, of a logistic regression fitted on ``num_train`` to predict k."""
    codes, factors = _arrays(codes, factors)
    rng, groups = np.random.default_rng(seed), _Groups(factors)

    def points(n):
        k = rng.integers(factors.shape[1], size=n)
        first = rng.integers(len(codes), size=(n, batch_size))
        second = np.stack([groups.draw(k[i], factors[first[i], k[i]], rng) for i in range(n)])
        return np.abs(codes[first] - codes[second]).mean(1), k

    (x_tr, k_tr), (x_ev, k_ev) = points(num_train), points(num_eval)
    fit = _fit(x_tr, k_tr, factors.shape[1])
    return {"beta_vae_score": fit.accuracy(torch.as_tensor(x_ev), torch.as_tensor(k_ev)),
            "beta_vae_score_train": fit.accuracy(torch.as_tensor(x_tr), torch.as_tensor(k_tr))}


def factor_vae_score(codes, factors, batch_size: int = 64, num_train: int = 10_000, num_eval: int = 5_000,
                     num_variance_estimate: int = 10_000, prune: float = 0.05, seed: int = 0) -> dict:
    """FactorVAE score (Kim & Mnih 2018): codes scaled by their standard deviation over
    ``num_variance_estimate`` rows, those whose standard deviation is below ``prune`` left out;
    each vote fixes a factor k at a random value over a batch, and the code of least scaled
    variance (ddof 1) votes for k; the majority-vote classifier (code -> its most frequent
    factor) from ``num_train`` votes; its accuracy on ``num_eval`` fresh votes."""
    codes, factors = _arrays(codes, factors)
    rng, groups = np.random.default_rng(seed), _Groups(factors)
    rows = rng.permutation(len(codes))[:num_variance_estimate]
    scale = codes[rows].var(0, ddof=1)
    active = np.sqrt(scale) >= prune
    if not active.any():
        return {"factor_vae_score": 0.0, "factor_vae_score_train": 0.0, "active_codes": 0}

    def votes(n):
        counts = np.zeros((codes.shape[1], factors.shape[1]), dtype=np.int64)
        for _ in range(n):
            k = rng.integers(factors.shape[1])
            value = factors[rng.integers(len(codes)), k]
            batch = codes[groups.draw(k, np.full(batch_size, value), rng)]
            ratio = batch[:, active].var(0, ddof=1) / scale[active]
            counts[np.flatnonzero(active)[ratio.argmin()], k] += 1
        return counts

    train, evaluation = votes(num_train), votes(num_eval)
    classifier = train.argmax(1)
    rows_ = np.arange(len(classifier))
    return {"factor_vae_score": float(evaluation[rows_, classifier].sum() / evaluation.sum()),
            "factor_vae_score_train": float(train[rows_, classifier].sum() / train.sum()),
            "active_codes": int(active.sum())}


def all_metrics(codes, factors, seed: int = 0) -> dict:
    """Every metric of this module on the same rows, as one flat dict (the matrices included)."""
    out = {}
    for metric in (mig, beta_vae_score, factor_vae_score, dci, sap):
        out.update(metric(codes, factors, seed=seed))
    return out


def captured_factor(mutual_info, factor_names, codes=None, prune: float = 0.05) -> list[str]:
    """For each code, the name of the factor it shares most information with (``mig``'s matrix),
    or '-' for a code whose standard deviation over ``codes`` is below ``prune`` (inactive, as
    the FactorVAE score prunes it: its binned values carry only estimation noise)."""
    mi = np.asarray(mutual_info)
    active = np.ones(len(mi), bool) if codes is None else _arrays(codes, np.zeros((len(codes), 1)))[0].std(0) >= prune
    return [factor_names[int(row.argmax())] if on else "-" for row, on in zip(mi, active)]
