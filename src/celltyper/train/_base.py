"""The training plan every celltyper model trains with: scvi-tools' ``TrainingPlan``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from scvi.module.base import LossOutput
from scvi.train import TrainingPlan
from torch import Tensor

#: scvi-tools' ``compute_and_log_metrics`` without its ``torch.inference_mode`` decorator.
_scvi_compute_and_log_metrics = getattr(
    TrainingPlan.compute_and_log_metrics, "__wrapped__", TrainingPlan.compute_and_log_metrics
)

OptimizerName = Literal["Adam", "AdamW", "Adadelta", "SGD"]

#: Optimizers scvi-tools' plan does not name, given to it as an ``optimizer_creator``.
_EXTRA_OPTIMIZERS = {"Adadelta": torch.optim.Adadelta, "SGD": torch.optim.SGD}


def merge_minibatches(batch: dict[str, Tensor] | list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """One minibatch dict from the list a ``ConcatDataLoader`` yields (or a dict as is)."""
    if isinstance(batch, dict):
        return batch
    if len(batch) == 1:
        return batch[0]
    return {key: torch.cat([part[key] for part in batch]) for key in batch[0]}


def _suffixed(values: dict[str, Tensor] | None, suffix: str) -> dict[str, Tensor]:
    return {f"{name}{suffix}": value for name, value in (values or {}).items()}


def loss_terms(loss_output: LossOutput) -> dict[str, Tensor]:
    """The weighted terms of a celltyper module's loss: they add up to ``loss_output.loss``.

    A celltyper module reports each term of its objective, already multiplied by its
    weight, in ``extra_metrics`` under a name ending in ``_loss``; other entries there
    (weights, accuracies, fractions) are diagnostics.
    """
    return {
        name: value
        for name, value in (loss_output.extra_metrics or {}).items()
        if name.endswith("_loss")
    }


def warmup_cosine_factor(epoch: int, max_epochs: int, warmup_epochs: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup_epochs``, then a cosine decay.

    The factor is ``(epoch + 1) / warmup_epochs`` during the warm-up and
    ``0.5 (1 + cos(pi t))`` after it, ``t`` running from 0 at the end of the warm-up to 1
    one epoch after the last, so the last epoch still learns.
    """
    if epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    n_decay = max(1, max_epochs - warmup_epochs)
    t = min((epoch - warmup_epochs) / n_decay, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * t))


class CellTyperTrainingPlan(TrainingPlan):
    """:class:`scvi.train.TrainingPlan` for celltyper's modules.

    Every step runs ``module.forward(tensors, loss_kwargs=...)`` as scvi-tools does: the
    objective lives in the module's ``loss``, whose keyword arguments (the method's
    hyperparameters) are accepted here and passed on (``**loss_kwargs``). A subclass keeps
    only what needs the step or the epoch, through :meth:`scheduled_loss_kwargs` (a ramp
    weight, for example). On top of scvi's plan it adds:

    - the optimizers ``"Adadelta"`` and ``"SGD"`` (through scvi's ``optimizer_creator``);
    - :meth:`trainable_parameters`, the parameters a stage trains;
    - the list of minibatches of a ``ConcatDataLoader`` (labelled + unlabelled cells)
      merged into one;
    - ``module.train()`` at the start of every epoch: scvi's runner and surgery leave
      the module in eval mode, and Lightning keeps submodule modes, so a second
      ``train()`` would otherwise run with BatchNorm statistics and dropout frozen;
    - logging of each named term of the module's ``LossOutput`` (``<term>_train``,
      ``<term>_validation``), and of scheduled weights, every value reduced across the
      processes of a distributed run (``sync_dist``).

    Validation asks the module for its validation criterion
    (:meth:`~celltyper.module.CellTyperModule.validation_loss`, for a classifier the
    cross-entropy of the held-out labelled cells) and logs it as ``validation_loss``,
    which early stopping monitors.

    Parameters
    ----------
    module
        A :class:`~celltyper.module.CellTyperModule`.
    optimizer
        ``"Adam"``, ``"AdamW"``, ``"Adadelta"`` or ``"SGD"``.
    lr
        Learning rate.
    weight_decay
        L2 penalty of the optimizer.
    eps
        ``eps`` of Adam / AdamW (torch's default; scvi-tools' plan defaults to 0.01).
    **kwargs
        Keywords of :class:`scvi.train.TrainingPlan` (``n_epochs_kl_warmup``,
        ``max_kl_weight``, ``reduce_lr_on_plateau``, ...) and of the module's ``loss``.
    """

    #: Whether the module reports a reconstruction loss and KL terms (scvi's ELBO metrics).
    log_elbo: bool = False
    #: Loss keywords :meth:`scheduled_loss_kwargs` sets every step (not user settings).
    scheduled_loss_arguments: tuple[str, ...] = ()

    def __init__(
        self,
        module,
        *,
        optimizer: OptimizerName = "Adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        **kwargs,
    ):
        creator = None
        if optimizer in _EXTRA_OPTIMIZERS:
            optimizer_cls = _EXTRA_OPTIMIZERS[optimizer]

            def creator(params: Iterable[Tensor]) -> torch.optim.Optimizer:
                return optimizer_cls(params, lr=self.lr, weight_decay=self.weight_decay)

        elif optimizer not in ("Adam", "AdamW", "Custom"):
            raise ValueError(
                f"optimizer must be one of ['Adadelta', 'Adam', 'AdamW', 'SGD'], got "
                f"{optimizer!r}."
            )
        kwargs.setdefault("optimizer_creator", creator)
        super().__init__(
            module,
            optimizer="Custom" if creator is not None else optimizer,
            lr=lr,
            weight_decay=weight_decay,
            eps=eps,
            **kwargs,
        )
        self.optimizer_label = optimizer
        #: Per-epoch ``{name: (weighted sum, weight)}`` of :meth:`add_to_epoch_means`.
        self._epoch_sums: dict[str, tuple[Tensor | float, int]] = {}

    # -- what a stage trains ----------------------------------------------------------------
    def trainable_parameters(self) -> Iterable[Tensor]:
        """The parameters the optimizer updates (all of the module's by default)."""
        return self.module.parameters()

    def configure_optimizers(self):
        trainable = [p for p in self.trainable_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(
                "No trainable parameter is left (all were frozen, e.g. by load_query_data). "
                "Pass unfrozen=True to load_query_data to fine-tune the whole network."
            )
        config = super().configure_optimizers()
        optimizer = config["optimizer"]
        # scvi's plan hands every module parameter that requires a gradient to the
        # optimizer; a stage trains its own subset.
        optimizer.param_groups.clear()
        optimizer.add_param_group({"params": trainable})
        return config

    @property
    def use_sync_dist(self) -> bool:
        """Whether logged epoch values are reduced across processes (several of them)."""
        return self._trainer is not None and self.trainer.world_size > 1

    def on_train_epoch_start(self) -> None:
        self.module.train()

    # -- steps ------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """The module's forward pass (inference, generative step and loss)."""
        return self.module(*args, **kwargs)

    def epoch_progress(self, batch_idx: int) -> float:
        """Current epoch as a float, so ramps move smoothly within an epoch."""
        n_batches = self.trainer.num_training_batches if self._trainer is not None else 0
        if not n_batches or n_batches == float("inf"):
            return float(self.current_epoch)
        return self.current_epoch + batch_idx / n_batches

    def scheduled_loss_kwargs(self, batch_idx: int) -> dict[str, Any]:
        """Loss keywords that change during training (logged each epoch); none by default."""
        return {}

    def training_step(self, batch, batch_idx: int):
        batch = merge_minibatches(batch)
        scheduled = self.scheduled_loss_kwargs(batch_idx)
        if "kl_weight" in self.loss_kwargs:
            scheduled["kl_weight"] = self.kl_weight
        loss_output = self._forward_checked(batch, batch_idx, {**self.loss_kwargs, **scheduled})
        n = loss_output.n_obs_minibatch
        self.add_to_epoch_means({"train_loss": loss_output.loss, **scheduled}, n)
        self.add_to_epoch_means(_suffixed(loss_output.extra_metrics, "_train"), n)
        if self.log_elbo:
            self.add_to_epoch_means(
                {
                    "reconstruction_loss_train": loss_output.reconstruction_loss_sum / n,
                    "kl_local_train": loss_output.kl_local_sum / n,
                },
                n,
            )
            self.add_to_epoch_means({"kl_global_train": loss_output.kl_global_sum}, 1)
        return loss_output.loss

    @torch.no_grad()
    def add_to_epoch_means(self, values: dict[str, Tensor | float], n: int) -> None:
        """Add one training step's values, each weighted by ``n`` (the minibatch's cells,
        or 1 for a per-minibatch term), to the epoch's means, which
        :meth:`on_train_epoch_end` logs.

        One ``self.log`` per value and step costs Lightning about 0.6 ms (it moves and
        reduces a result object every time): a tenth of SCATLASVAE's epoch on the Kang
        demo.
        """
        sums = self._epoch_sums
        for name, value in values.items():
            value = torch.as_tensor(value).detach().float()
            total, count = sums.get(name, (0.0, 0))
            sums[name] = (total + value * n, count + n)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        sums, self._epoch_sums = self._epoch_sums, {}
        means = {name: total / max(count, 1) for name, (total, count) in sums.items()}
        if "reconstruction_loss_train" in means:
            # scvi-tools' ELBO: per-cell terms plus the global KL spread over the cells.
            n_total = self.n_obs_training if self.n_obs_training else 1
            means["elbo_train"] = (
                means["reconstruction_loss_train"]
                + means["kl_local_train"]
                + means["kl_global_train"] / n_total
            )
        for name, value in means.items():
            self.log(
                name,
                value,
                on_step=False,
                on_epoch=True,
                prog_bar=name == "train_loss",
                sync_dist=self.use_sync_dist,
            )

    def _diverged(self, batch_idx: int, found: str) -> FloatingPointError:
        """The error that stops a diverged fit, before NaN weights turn into answers."""
        return FloatingPointError(
            f"{type(self.module).__name__}'s training {found} at epoch {self.current_epoch}, "
            f"step {batch_idx}. Training diverged: train for fewer epochs (max_epochs), or "
            f"with a lower learning rate (lr={self.lr})."
        )

    def _weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.module.parameters())

    def _forward_checked(self, batch: dict[str, Tensor], batch_idx: int, loss_kwargs: dict):
        """``forward``, with a NaN or infinite loss, or NaN weights, raised clearly."""
        try:
            _, _, loss_output = self.forward(batch, loss_kwargs=loss_kwargs)
        except ValueError as error:
            # NaN weights fail first in a distribution's argument check, far from the cause.
            if self._weights_finite():
                raise
            raise self._diverged(batch_idx, "weights became nan") from error
        if not bool(torch.isfinite(loss_output.loss).all()):
            terms = {
                k: round(float(v.detach().mean()), 4) for k, v in loss_terms(loss_output).items()
            }
            value = float(loss_output.loss.detach().float().mean())
            raise self._diverged(batch_idx, f"loss became {value} (terms: {terms})")
        return loss_output

    def validation_loss_output(self, batch: dict[str, Tensor]) -> LossOutput | None:
        """The validation criterion of a minibatch (``None``: nothing to score in it)."""
        return self.module.validation_loss(batch)

    def validation_step(self, batch, batch_idx: int):
        loss_output = self.validation_loss_output(merge_minibatches(batch))
        if loss_output is None:
            return None
        self.log(
            "validation_loss",
            loss_output.loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=loss_output.n_obs_minibatch,
            sync_dist=self.use_sync_dist,
        )
        self.compute_and_log_metrics(loss_output, self.val_metrics, "validation")
        return loss_output.loss

    @torch.no_grad()
    def compute_and_log_metrics(self, loss_output: LossOutput, metrics, mode: str) -> None:
        """scvi's ELBO metrics (for modules with a likelihood) and every extra metric.

        Under ``no_grad`` rather than scvi-tools' inference mode: on several processes
        the logged values are reduced in place at the end of the epoch, which tensors
        made in inference mode refuse.
        """
        if self.log_elbo:
            _scvi_compute_and_log_metrics(self, loss_output, metrics, mode)
            return
        for name, value in (loss_output.extra_metrics or {}).items():
            value = value.detach() if isinstance(value, Tensor) else value
            self.log(
                f"{name}_{mode}",
                value,
                on_step=False,
                on_epoch=True,
                batch_size=loss_output.n_obs_minibatch,
                sync_dist=self.use_sync_dist,
            )
