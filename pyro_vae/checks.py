"""Checks on user data, each failing with a message that names the problem and the fix."""

from __future__ import annotations

import torch


class DataError(ValueError):
    """Data that a model cannot be trained or evaluated on, with the fix in the message."""


def check_finite(x: torch.Tensor, what: str) -> None:
    if x.numel() == 0:
        raise DataError(f"{what} is empty: there is nothing to train or evaluate on.")
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = bad.reshape(len(x), -1).any(1).nonzero().flatten()
        raise DataError(
            f"{what} holds {int(bad.sum())} NaN or infinite values in {len(rows)} rows (first: "
            f"row {int(rows[0])}). Remove or impute those rows (e.g. torch.nan_to_num) first."
        )


def check_features(x: torch.Tensor, x_dim: int, owner: str) -> None:
    """x must be a (batch, x_dim) tensor of flat data points."""
    if x.dim() != 2 or x.shape[-1] != x_dim:
        got = x.shape[-1] if x.dim() else "?"
        raise DataError(
            f"{owner} expects data of shape (batch, {x_dim}), got {tuple(x.shape)}. Flatten each "
            f"data point to {x_dim} features, or build the model for this data (x_dim={got})."
        )
