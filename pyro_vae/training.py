"""The one SVI loop: every model, guide and estimator trains here.

Per step: a batch from a random permutation (binarized afresh where the dataset asks),
loss = objective(x, **schedule.weights(t)) (the estimator's loss per data point, with the
KL weight beta, or the capacity C, that the schedule gives at progress t), backward,
optional gradient clipping, optimizer step. Per epoch: the test loss and one metrics line,
handed to the callbacks (``callbacks.py``: the checkpoint, early stopping, TensorBoard, the
printed line, and the user's own). Losses are read back to the host once per epoch (and every
``log_every`` steps while a progress bar shows), never inside the step.

Read ``train`` -> ``_setup`` (build and check everything, then claim the run directory) ->
``_loop`` (the epochs) -> ``train_epoch`` (the steps).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from pyro_vae.amp import amp_dtype, autocast_layers
from pyro_vae.callbacks import (
    Callback,
    EarlyStopping,
    PrintEpochs,
    SaveCheckpoint,
    TensorBoard,
    TrainingState,
)
from pyro_vae.checks import DataError, check_data_scale, check_data_support
from pyro_vae.config import TrainConfig, build_model_and_guide, check_resume
from pyro_vae.data import Dataset, load_dataset
from pyro_vae.distributed import SINGLE, World, resolve_device  # noqa: F401 (also the training API)
from pyro_vae.errors import ConfigError, TrainingDiverged
from pyro_vae.objectives import Objective, check_pair, make_estimator, make_objective
from pyro_vae.objectives.tc import tell_dataset_size
from pyro_vae.objectives.traced import say_on_stderr, trace_objective
from pyro_vae.programs import bind
from pyro_vae.programs import context_keys as program_context_keys
from pyro_vae.run import (
    FIGURES,
    RunClaim,
    RunDirError,
    claim_run_dir,
    code_paths,
    load_checkpoint,
    load_config,
    read_metrics,
    save_config,
    set_rng_state,
)
from pyro_vae.schedules import KLSchedule


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says what was saved."""


@torch.no_grad()
def mean_loss(objective: Objective, x: torch.Tensor, batch_size: int = 1000, **context) -> float:
    """The objective (at beta = 1) averaged over every row of x (and of the context tensors)."""
    total = torch.zeros((), device=x.device)
    with pyro.validation_enabled(False):
        for i in range(0, len(x), batch_size):
            chunk = x[i : i + batch_size]
            total += objective(chunk, **{k: v[i : i + batch_size] for k, v in context.items()}) * len(chunk)
    return float(total) / len(x)


def _sharded_loss(objective, dataset: Dataset, split: str, context_keys, world: World) -> float:
    """mean_loss over this rank's rows of a split, averaged over ranks by row count."""
    x = getattr(dataset, split)
    rows = torch.arange(world.rank, len(x), world.size, device=x.device)
    context = {k: v[rows] for k, v in dataset.context(context_keys, split=split).items()}
    return world.weighted_mean(mean_loss(objective, x[rows], **context), len(rows))


@torch.no_grad()
def accuracy(guide, x: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Fraction of rows whose label the guide's classifier q(y|x) predicts."""
    hits = sum(int((guide.classify(x[i : i + batch_size]) == labels[i : i + batch_size]).sum())
               for i in range(0, len(x), batch_size))
    return hits / len(x)


def _diverged(epoch: int, step: int, loss: float, claim: RunClaim, config: TrainConfig) -> TrainingDiverged:
    run_dir = claim.run_dir
    hints = [f"a lower --lr (now {config.lr:g})"]
    flags = [f"--lr {config.lr / 10:g}"]
    if not config.clip_grad:
        hints.append("--clip-grad 10")
        flags.append("--clip-grad 10")
    if config.likelihood == "gaussian":
        hints.append("a less flexible likelihood (the learned Gaussian scale can collapse)")
    where = f"training diverged: the loss is {loss} at epoch {epoch}, step {step}."
    if claim.saved_epoch is None:
        return TrainingDiverged(f"{where} No checkpoint was saved (no epoch finished), so there is nothing to "
                                f"resume: train again with {', '.join(hints)}.")
    trust = " --trust-code" if code_paths(config) else ""
    return TrainingDiverged(
        f"{where} The last good checkpoint (epoch {claim.saved_epoch}) is kept in {run_dir}. Try "
        f"{', '.join(hints)}: `pyro-vae train --resume {run_dir} --epochs {config.epochs} {' '.join(flags)}{trust}`."
    )


def _interrupted(claim: RunClaim, config: TrainConfig, removed: bool) -> TrainingInterrupted:
    run_dir, trust = claim.run_dir, " --trust-code" if code_paths(config) else ""
    if claim.saved_epoch is not None:
        return TrainingInterrupted(f"interrupted: epoch {claim.saved_epoch} is saved in {run_dir}; continue with "
                                   f"`pyro-vae train --resume {run_dir} --epochs {config.epochs}{trust}`")
    if claim.resume:
        return TrainingInterrupted(f"interrupted before the resumed training started: {run_dir} is as it was; "
                                   f"continue with `pyro-vae train --resume {run_dir} --epochs {config.epochs}{trust}`")
    if not claim.taken:
        return TrainingInterrupted(f"interrupted before training started: nothing was written to {run_dir}")
    return TrainingInterrupted(
        "interrupted before the first epoch finished: nothing was saved, and there is no run to resume"
        + (f" ({run_dir} removed)" if removed else ""))


def _first_nonfinite(losses: torch.Tensor) -> int:
    """The step (from 1) of the first non-finite loss among the epoch's per-step losses."""
    return int((~torch.isfinite(losses)).nonzero()[0, 0]) + 1


def train_epoch(objective, optimizer, dataset: Dataset, batch_size: int, schedule, epoch: int,
                clip_grad: float | None = None, context_keys=(), progress: bool = False,
                log_every: int = 50, desc: str = "", seed: int = 0,
                world: World = SINGLE, labelled_every: int = 0) -> tuple[float, dict, float | None]:
    """One pass over the training data; returns (mean loss, last KL weights, last gradient norm).

    The epoch's permutation comes from (seed, epoch) alone, so every process of a distributed
    run cuts the same global batches and each takes its own shard of each.

    Raises FloatingPointError(step, loss) at the first step whose loss is not finite (checked when
    read back; the per-step losses stay on the device until then).
    Pyro's and torch's argument validation is off inside the loop: each check reads a tensor
    back to the host. The data were validated once before training.
    """
    objective.train()
    params = [p for p in objective.parameters() if p.requires_grad]
    batches = dataset.epoch_batches(batch_size, epoch_generator(seed, epoch, dataset.train.device), labelled_every)
    losses = torch.empty(len(batches), device=dataset.train.device)  # to find the first non-finite step
    grad_norm = None
    bar = tqdm(batches, desc=desc, disable=not progress, leave=False)
    with pyro.validation_enabled(False):
        for step, index in enumerate(bar, 1):
            index = world.shard(index)
            kl_weights = schedule.weights(epoch - 1 + step / len(batches))
            loss = objective(dataset.batch(index), **kl_weights, **dataset.context(context_keys, index))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
            optimizer.step()
            losses[step - 1] = loss.detach()
            if progress and step % log_every == 0:
                value = float(loss)
                if not math.isfinite(value):
                    first = _first_nonfinite(losses[:step])
                    raise FloatingPointError(first, float(losses[first - 1]))
                bar.set_postfix(loss=f"{value:.2f}", **{k: f"{v:.3g}" for k, v in kl_weights.items()})
    mean = float(losses.sum()) / len(batches)
    if not math.isfinite(mean):
        first = _first_nonfinite(losses)
        raise FloatingPointError(first, float(losses[first - 1]))
    return mean, kl_weights, (None if grad_norm is None else float(grad_norm))


def check_first_step(objective, dataset: Dataset, context_keys, batch_size: int) -> None:
    """One step's loss under Pyro's validation (``pyro.validation_enabled``), once before
    training: a program that does not fit its data (a value outside the support of a
    distribution, a shape Pyro refuses) fails here with Pyro's message, before anything is
    written. The step runs on a forked RNG and without
    gradients, so training draws exactly what it would have drawn without the check; inside the
    loop validation stays off (each check reads a tensor back to the host)."""
    n = min(batch_size, len(dataset.train))
    rows = torch.arange(n, device=dataset.train.device)
    devices = [rows.device] if rows.device.type == "cuda" else []
    with pyro.validation_enabled(True), torch.random.fork_rng(devices=devices):
        x, context = dataset.batch(rows), dataset.context(context_keys, rows)  # binarized as in training
        try:
            with torch.no_grad():
                objective(x, **context)
        except ValueError as e:  # only Pyro's and torch's value checks: a bug of ours keeps its traceback
            if not any(m in str(e) for m in ("Error while computing log_prob", "Expected value argument")):
                raise
            raise DataError(f"the model does not fit the training data at the first step: "
                            f"{_first_line(e)}. Check that the observation distribution matches the "
                            f"data (e.g. a Bernoulli needs values in {{0, 1}}; use a Gaussian or "
                            f"ContinuousBernoulli for real values), or rescale the data.") from e


def kl_methods(objective, first: dict) -> dict | None:
    """How the estimator treats each latent site's KL (``MeanFieldELBO.kl_methods``: the closed
    form where it is valid, Monte Carlo elsewhere, with the reason), or None for estimators
    without a separate KL term. Traced on a forked RNG: training draws what it would have."""
    estimator = objective.estimator
    if not hasattr(estimator, "kl_methods"):
        return None
    x = first["x"]
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), \
            pyro.validation_enabled(False):
        return estimator.kl_methods(objective.model, objective.guide, x, **first["context"])


def _first_line(e: Exception) -> str:
    """The informative line of a Pyro error ("Error while computing log_prob at site 'x':" is
    followed by torch's own message, then the trace's shapes)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
    head = lines[0].rstrip(":. ")
    detail = next((line for line in lines[1:] if "support" in line or "shape" in line), None)
    return f"{head}: {detail.rstrip('.:')}" if detail and head.startswith("Error while") else head


def epoch_generator(seed: int, epoch: int, device) -> torch.Generator:
    """The random source of one epoch's data order: a function of (seed, epoch) only."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


def train(
    config: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    quiet: bool = False,
    dataset: Dataset | None = None,
    log_every: int = 50,
    overwrite: bool = False,
    callbacks: Sequence[Callback] = (),
) -> list[dict]:
    """Train (or, with ``resume``, continue) a run in ``run_dir``; returns the metrics rows.

    A folder that already holds a run is refused unless ``resume`` or ``overwrite`` is given;
    with ``overwrite`` the old run's files are removed only once the new model, guide and data
    agree. ``RUN/.lock`` keeps a second training out while this one writes. Under torchrun
    every process calls this; rank 0 alone writes the run directory. On Ctrl-C it raises
    ``TrainingInterrupted``, whose message says what was saved; a training that saved no epoch
    leaves nothing behind. ``callbacks`` (``pyro_vae.callbacks.Callback``) run after the
    built-in ones (checkpoint, early stopping, TensorBoard, the per-epoch line).
    """
    claim = claim_run_dir(run_dir, overwrite, resume)  # refuses before any work
    if resume:
        check_resume(load_config(run_dir), config, run_dir)
    try:
        setup = _setup(config, claim, quiet, dataset)
        return _loop(setup, [*_builtin_callbacks(setup), *callbacks], log_every)
    except BaseException as e:
        removed = claim.discard() and claim.created
        if isinstance(e, KeyboardInterrupt) and not isinstance(e, TrainingInterrupted):
            raise _interrupted(claim, config, removed) from None
        raise
    finally:
        claim.release()


@dataclass
class Setup:
    """Everything the loop needs, built and checked by ``_setup`` before anything is written."""

    state: TrainingState
    dataset: Dataset
    objective: torch.nn.Module  # what the loop steps (DistributedDataParallel around it when distributed)
    evaluator: torch.nn.Module  # the same objective, unwrapped, for test and validation losses
    schedule: KLSchedule
    context_keys: tuple
    start_epoch: int


def _loop(setup: Setup, callbacks: list, log_every: int) -> list[dict]:
    """The SVI loop: per epoch, set the learning rate, step through the training data, measure
    the test (and validation) loss, and hand the metrics row to the callbacks."""
    state, config = setup.state, setup.state.config
    show = not state.quiet and state.is_main and sys.stderr.isatty()  # a progress bar
    for callback in callbacks:
        callback.on_train_start(state)
    for epoch in range(setup.start_epoch, config.epochs + 1):
        if state.stop:
            break
        state.epoch, t0 = epoch, time.perf_counter()
        lr = config.lr_at(epoch)  # the config's rate wins on --resume (stage-wise schedules)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        try:
            train_loss, state.kl_weights, grad_norm = train_epoch(
                setup.objective, state.optimizer, setup.dataset, config.batch_size, setup.schedule, epoch,
                config.clip_grad, setup.context_keys, progress=show, log_every=log_every,
                desc=f"epoch {epoch}/{config.epochs}", seed=config.seed, world=state.world,
                labelled_every=config.labelled_every)
        except FloatingPointError as e:
            raise _diverged(epoch, e.args[0], e.args[1], state.claim, config) from None
        row = _epoch_row(setup, state.world.weighted_mean(train_loss, 1.0), grad_norm, lr, t0)
        state.metrics.append(row)
        for callback in callbacks:
            callback.on_epoch_end(state, row)
    for callback in callbacks:
        callback.on_train_end(state)
    return state.metrics


def _epoch_row(setup: Setup, train_loss: float, grad_norm: float | None, lr: float, t0: float) -> dict:
    """The epoch's metrics line: losses (nats per data point), the KL weights, the settings a
    --resume may change as this epoch ran, accuracies where the guide classifies."""
    state, dataset, evaluator, keys = setup.state, setup.dataset, setup.evaluator, setup.context_keys
    config, guide = state.config, state.guide
    evaluator.eval()
    row = {"epoch": state.epoch, "train_loss": train_loss,
           "test_loss": _sharded_loss(evaluator, dataset, "test", keys, state.world),
           "epoch_time_s": time.perf_counter() - t0, **state.kl_weights, "lr": lr,
           "clip_grad": config.clip_grad, "early_stopping": config.early_stopping,
           "device": str(dataset.train.device), "jit": getattr(evaluator, "traced", False), "amp": config.amp}
    if hasattr(guide, "classify") and dataset.test_labels is not None:
        row["test_accuracy"] = accuracy(guide, dataset.test, dataset.test_labels)
        if dataset.valid_labels is not None:  # for choosing the epoch without the test set
            row["valid_accuracy"] = accuracy(guide, dataset.valid, dataset.valid_labels)
    if dataset.valid is not None:
        row["valid_loss"] = _sharded_loss(evaluator, dataset, "valid", keys, state.world)
    if grad_norm is not None:
        row["grad_norm"] = grad_norm
    if callable(getattr(state.model, "epoch_metrics", None)):  # a program's own per-epoch statistics
        row.update(state.model.epoch_metrics(row))
    return row


def _builtin_callbacks(setup: Setup) -> list[Callback]:
    config, state = setup.state.config, setup.state
    found: list[Callback] = [SaveCheckpoint()]
    if config.tensorboard and state.is_main:
        found.append(TensorBoard(state.run_dir, config.image_shape))
    if config.early_stopping:
        found.append(EarlyStopping(config.early_stopping))
    found.append(PrintEpochs())
    return found


def _setup(config: TrainConfig, claim: RunClaim, quiet: bool, dataset: Dataset | None) -> Setup:
    """Device, data, model and guide, their checks, the objective and the optimizer; then, once
    everything agrees, the run directory is claimed and (on --resume) the checkpoint loaded."""
    device = resolve_device(config.device)
    world = World.from_env(device)
    device = world.device(device)
    pyro.set_rng_seed(config.seed + world.rank)  # latent noise and binarization differ per rank
    pyro.clear_param_store()
    dataset = _load_data(config, device, dataset)
    model, guide = build_model_and_guide(config, dataset.train_mean())
    model.to(device), guide.to(device)
    context_keys = program_context_keys(model, guide)  # e.g. ("y",): labels as context
    first = {"x": dataset.train[:2], "context": dataset.context(context_keys, slice(0, 2))}  # rows to trace
    bind(model, guide, first["x"], **first["context"])  # parameters of functions and pyro.param programs
    if config.amp:
        for module in (model, guide):
            autocast_layers(module, device.type, amp_dtype(config.amp))
    schedule = KLSchedule.from_config(config)  # decides beta (or the capacity C) each step
    estimator = tell_dataset_size(make_estimator(config.estimator, config.particles), len(dataset.train))  # beta-tcvae's N
    objective = make_objective(model, guide, estimator, schedule)
    _check_before_training(objective, dataset, context_keys, first, config, world, quiet)
    objective = trace_objective(objective, config.jit, say=say_on_stderr if world.is_main and not quiet else lambda line: None)
    optimizer = torch.optim.Adam(objective.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    evaluator = objective
    if world.size > 1:
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    state = TrainingState(config=config, run_dir=claim.run_dir, model=model, guide=guide, optimizer=optimizer,
                          world=world, claim=claim, quiet=quiet)
    start_epoch = _claim_and_resume(state, dataset)
    return Setup(state, dataset, objective, evaluator, schedule, context_keys, start_epoch)


def _load_data(config: TrainConfig, device, dataset: Dataset | None) -> Dataset:
    """The configured data on ``device`` (or ``dataset`` as given); what it says of itself (sizes,
    image shape, classes, standardization) is written into ``config``."""
    if dataset is None:
        dataset = load_dataset(config.dataset, device, config.data_dir, config.validation,
                               config.train_size, config.test_size, config.image_size, config.classes,
                               config.image_shape, config.standardize)
    config.x_dim = dataset.x_dim
    config.image_shape = list(dataset.image_shape) if dataset.image_shape else None
    config.num_classes = dataset.num_classes
    config.standardization = dataset.standardization.record() if dataset.standardization else None
    if config.early_stopping and dataset.valid is None:
        raise ConfigError(f"--early-stopping {config.early_stopping} watches the validation split: "
                          f"add --validation N (e.g. --validation 10000)")
    return dataset.keep_labels(config.labels, config.seed) if config.labels else dataset


def _check_before_training(objective, dataset: Dataset, context_keys, first: dict, config: TrainConfig,
                           world: World, quiet: bool) -> None:
    """Model, guide and data agree (sites, shapes, the data inside the observation's support,
    one validated step), before anything is written; records how each KL is computed."""
    model, guide = objective.model, objective.guide
    with pyro.validation_enabled(False):  # site names, shapes and plates; values come next
        check_pair(model, guide, first["x"], **first["context"])
    check_data_support(model, dataset.train, f"the training data of {config.dataset!r}", dataset.binarize, guide,
                       **first["context"])
    check_data_support(model, dataset.test, f"the test data of {config.dataset!r}", guide=guide,
                       **dataset.context(context_keys, slice(0, 2), "test"))
    if world.is_main:
        check_data_scale(model, dataset.train, guide=guide, **first["context"])  # a hint: --standardize
    check_first_step(objective, dataset, context_keys, config.batch_size)
    config.kl_methods = kl_methods(objective, first)
    if config.kl_methods and not quiet and world.is_main:
        print(f"{config.estimator}: " + "; ".join(f"{site} KL {how}" for site, how in config.kl_methods.items()),
              file=sys.stderr)


def _claim_and_resume(state: TrainingState, dataset: Dataset) -> int:
    """Lock the run directory (every process stops if the main one may not write), load the
    checkpoint on --resume, write config.json; returns the first epoch to train."""
    config, run_dir, world, claim = state.config, state.run_dir, state.world, state.claim
    refusal = None
    if world.is_main:  # only now that model, guide and data agree: nothing is written before
        try:
            claim.take()  # lock; with --overwrite, remove the old run's files
            (run_dir / FIGURES).mkdir(parents=True, exist_ok=True)
        except RunDirError as e:
            refusal = str(e)
    refusal = world.gather(refusal)[0]
    if refusal is not None:
        raise RunDirError(refusal)
    start_epoch = 1
    if claim.resume:
        saved = load_checkpoint(run_dir)  # on the CPU (RNG states must be); load_state_dict moves
        if saved["epoch"] >= config.epochs:
            raise ConfigError(f"{run_dir} has trained {saved['epoch']} epochs, and --epochs {config.epochs} is the "
                              f"total to reach: give --epochs {saved['epoch'] + 10} (or any number above "
                              f"{saved['epoch']}) to train further")
        state.model.load_state_dict(saved["model"])
        state.guide.load_state_dict(saved["guide"])
        state.optimizer.load_state_dict(saved["optimizer"])
        set_rng_state(saved["rng"][world.rank])
        claim.saved_epoch, start_epoch = saved["epoch"], saved["epoch"] + 1
        state.metrics = [m for m in read_metrics(run_dir) if m["epoch"] <= saved["epoch"]]
    if world.is_main:
        if not claim.resume:  # a resume writes its settings with its first saved epoch (SaveCheckpoint)
            save_config(run_dir, config)
        if dataset.standardization is not None:
            dataset.standardization.save(run_dir)  # a tensor file where config.json refers to one
    return start_epoch
