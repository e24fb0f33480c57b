"""One training path for every celltyper model: ``train()`` written once."""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import scvi.train
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerStatus
from scvi.model._utils import (
    get_max_epochs_heuristic,
    parse_device_args,
    use_distributed_sampler,
)
from scvi.train import TrainRunner

from celltyper._utils import seeded
from celltyper.train import RestoreBestWeights
from celltyper.train._callbacks import SyncProcesses

#: Splitter arguments ``train()`` sets itself from its own options or the model.
_SPLITTER_INTERNALS = {
    "self",
    "adata_manager",
    "n_labels",
    "validation_size",
    "train_size",
    "batch_size",
    "seed",
    "allow_unlabelled_only",
}
#: scvi plan arguments that are no user setting of a celltyper plan.
_PLAN_INTERNALS = {"self", "module", "update_only_decoder", "on_step", "on_epoch"}
#: scvi plan arguments that only matter to a loss with a KL term.
_KL_WARMUP_ARGUMENTS = {
    "n_epochs_kl_warmup",
    "n_steps_kl_warmup",
    "max_kl_weight",
    "min_kl_weight",
}
#: Arguments of a module's ``loss`` that are data, not hyperparameters.
_LOSS_DATA_ARGUMENTS = {"self", "tensors", "inference_outputs", "generative_outputs"}


@dataclass(frozen=True)
class TrainingStage:
    """One fit of the module by scvi-tools' ``TrainRunner``.

    A model trains through the stages that :meth:`TrainingMixin._training_stages`
    returns, in order (one for most models; CELLULAR trains an encoder, then a classifier;
    SCPRETRAIN pretrains on pseudo-labels, then fine-tunes).

    Parameters
    ----------
    name
        Name of the stage (``"train"``, ``"pretrain"``, ...).
    plan_cls
        Its training plan, a :class:`~celltyper.train.CellTyperTrainingPlan`.
    max_epochs
        Default epochs; ``None`` uses scvi-tools' heuristic from the number of cells.
    epochs_option
        A ``train()`` keyword that sets this stage's epochs alone (e.g.
        ``"pretrain_epochs"``); otherwise ``train(max_epochs=...)`` sets them.
    plan_kwargs
        Settings of this stage's plan, under the user's ``plan_kwargs``.
    splitter_kwargs
        Keywords of the model's data splitter for this stage (``include_unlabelled``,
        ``balance_classes``, ...), under the user's ``datasplitter_kwargs``.
    monitor, monitor_mode
        Logged metric that early stopping and best-weight restoring follow, and whether
        it is minimised or maximised.
    early_stopping_patience
        Default patience of the early stopping.
    min_epochs
        Epochs before early stopping may stop the stage.
    keep_history_as
        Attribute of the model that keeps this stage's curves (``history`` holds the last
        stage's).
    """

    name: str
    plan_cls: type
    max_epochs: int | None = None
    epochs_option: str | None = None
    plan_kwargs: Mapping[str, Any] = field(default_factory=dict)
    splitter_kwargs: Mapping[str, Any] = field(default_factory=dict)
    monitor: str = "validation_loss"
    monitor_mode: Literal["min", "max"] = "min"
    early_stopping_patience: int = 20
    min_epochs: int = 0
    keep_history_as: str | None = None


def plan_parameters(plan_cls: type, module=None) -> set[str]:
    """Keyword arguments a training plan accepts, the module's loss keywords included.

    ``module`` may be a module or its class: only its ``loss`` signature is read.

    scvi-tools' plan passes its unknown keywords to ``module.loss``, so the method's
    hyperparameters are declared once, in the plan's or the loss's signature.
    """
    names: set[str] = set()
    for cls in plan_cls.__mro__:
        if cls is object or not issubclass(cls, pl.LightningModule):
            continue
        if cls is pl.LightningModule:
            break
        names |= _keyword_names(cls.__init__)
    names -= _PLAN_INTERNALS
    if module is not None:
        loss_names = _keyword_names(module.loss) - _LOSS_DATA_ARGUMENTS
        names |= loss_names
        if "kl_weight" not in loss_names:
            names -= _KL_WARMUP_ARGUMENTS
    # Loss keywords the plan sets every step (ramps, scvi's KL warm-up) cannot be set by
    # users.
    return names - {"kl_weight", *getattr(plan_cls, "scheduled_loss_arguments", ())}


def _keyword_names(function) -> set[str]:
    parameters = inspect.signature(function).parameters.values()
    return {
        p.name
        for p in parameters
        if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    }


def trainer_parameters() -> set[str]:
    """Keywords of scvi-tools' ``Trainer`` (and so of Lightning's ``Trainer``)."""
    names = _keyword_names(scvi.train.Trainer.__init__) | _keyword_names(pl.Trainer.__init__)
    return (names | {"ckpt_path", "callbacks"}) - {"self", "max_epochs"}


class StageCheckpoint(scvi.train.SaveCheckpoint):
    """Lightning's ``ModelCheckpoint`` (weights, optimizer state, epoch) every N epochs.

    It is an scvi-tools ``SaveCheckpoint`` in type only: scvi-tools then adds no
    checkpoint of its own (which would save whole models under ``scvi_log/``); every
    behaviour is Lightning's.
    """

    def __init__(self, dirpath: str, every_n_epochs: int):
        ModelCheckpoint.__init__(
            self,
            dirpath=dirpath,
            save_last=True,
            save_top_k=1,
            every_n_epochs=every_n_epochs,
            save_on_train_epoch_end=True,
        )
        self.load_best_on_end = False


for _name in [k for k in vars(scvi.train.SaveCheckpoint) if not k.startswith("__")]:
    if hasattr(ModelCheckpoint, _name):
        setattr(StageCheckpoint, _name, getattr(ModelCheckpoint, _name))
    else:  # scvi-tools' own hooks (NaN checks, logging) do nothing here
        setattr(StageCheckpoint, _name, lambda self, *args, **kwargs: None)


def _stage_checkpoint(directory, stage: TrainingStage, every: int) -> pl.Callback:
    """A checkpoint of ``stage`` every ``every`` epochs (``<directory>/<stage>/last.ckpt``)."""
    return StageCheckpoint(os.path.join(os.fspath(directory), stage.name), every)


def _resume_points(stages: list[TrainingStage], resume_from) -> dict[int, str]:
    """``{stage index: checkpoint}`` for the last stage checkpointed in ``resume_from``."""
    if resume_from is None:
        return {}
    found = {
        i: path
        for i, stage in enumerate(stages)
        if os.path.exists(path := os.path.join(os.fspath(resume_from), stage.name, "last.ckpt"))
    }
    if not found:
        names = [s.name for s in stages]
        raise ValueError(
            f"resume_from={os.fspath(resume_from)!r} holds no checkpoint of this model's "
            f"stages {names} (expected <stage>/last.ckpt, written by checkpoint_dir)."
        )
    last = max(found)
    return {last: found[last]}


def _device_count(accelerator, devices) -> int:
    """How many devices ``devices`` names for ``accelerator`` (as Lightning counts them)."""
    if isinstance(devices, list | tuple):
        return len(devices)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            devices = parse_device_args(accelerator, devices)[1]
    except Exception:  # Lightning raises its own error when training starts
        pass
    if isinstance(devices, list | tuple):
        return len(devices)
    if isinstance(devices, str):
        names = [d for d in devices.split(",") if d.strip()]
        if len(names) > 1 or devices.strip().endswith(","):
            return len(names)
        devices = names[0] if names else 1
    try:
        return int(devices)
    except (TypeError, ValueError):
        return 1


def check_distributed_strategy(
    accelerator, devices, strategy=None, num_nodes: int | str | None = 1
) -> None:
    """Refuse several devices or nodes without an explicit strategy.

    Lightning would pick plain ``"ddp"`` on its own: it starts the script again in new
    processes, which a notebook cannot do, and it lacks the unused-parameter detection
    that CELLULAR, SCPRETRAIN and RANKFORMER need (a stage leaves some parameters out).

    Raises
    ------
    ValueError
        ``devices`` names several devices (or ``num_nodes > 1``) and ``strategy`` is
        ``None`` or ``"auto"``.
    """
    if strategy is not None and not (isinstance(strategy, str) and strategy == "auto"):
        return
    advice = (
        'Pass an explicit strategy: strategy="ddp_find_unused_parameters_true" in a script '
        '(or under torchrun / SLURM), strategy="ddp_fork_find_unused_parameters_true" in a '
        "notebook. Lightning's own choice, plain 'ddp', cannot start from a notebook "
        "and fails on models whose stages leave parameters unused."
    )
    n_devices = _device_count(accelerator, devices)
    if n_devices > 1:
        raise ValueError(
            f"devices={devices!r} trains on {n_devices} devices, which needs a distributed "
            f"strategy. {advice}"
        )
    try:
        n_nodes = int(num_nodes if num_nodes is not None else 1)
    except (TypeError, ValueError):
        raise ValueError(f"num_nodes must be a whole number >= 1, got {num_nodes!r}.") from None
    if n_nodes > 1:
        raise ValueError(
            f"num_nodes={num_nodes!r} trains on several machines, which needs a distributed "
            f"strategy. {advice}"
        )


def _is_distributed(strategy) -> bool:
    """Whether ``strategy`` runs several processes (as scvi-tools tells: a DDP one)."""
    return use_distributed_sampler(strategy)


class TrainingMixin:
    """``train()`` for every celltyper model, with scvi-tools' conventions.

    A model declares:

    - ``_training_plan_cls`` and ``_data_splitter_cls``;
    - ``_train_defaults``: its defaults of the shared options (``batch_size``,
      ``validation_size``, ``early_stopping`` and, optionally, ``restore_best_weights``);
    - ``_train_options``: the names and defaults of options that choose its stages
      (SCNYM's ``config``, SCPRETRAIN's ``pretrain``), read by
      :meth:`_training_stages`;
    - :meth:`_training_stages`: the stages one ``train()`` call runs;
    - :meth:`_stage_plan_kwargs`: plan arguments computed from the data (class
      weights, ...), and :meth:`_stage_data` when a stage trains on other data than
      the model's splitter gives.
    """

    _train_defaults: ClassVar[dict[str, Any]] = {
        "batch_size": 128,
        "validation_size": 0.1,
        "early_stopping": True,
    }
    _train_options: ClassVar[dict[str, Any]] = {}
    #: Whether the last ``train()`` was stopped by Ctrl+C or SIGTERM (its model kept the
    #: best weights seen, with a warning).
    training_interrupted_: bool = False

    # -- hooks a model overrides ---------------------------------------------------------------
    def _training_stages(self, options: dict[str, Any]) -> list[TrainingStage]:
        """The stages one ``train()`` call runs (one stage with the model's plan)."""
        return [TrainingStage("train", self._training_plan_cls)]

    def _stage_plan_kwargs(self, stage: TrainingStage, datamodule) -> dict[str, Any]:
        """Plan arguments computed for ``stage`` from the data (none by default)."""
        return {}

    def _stage_data(self, stage: TrainingStage, splitter_kwargs: dict[str, Any]):
        """The data module ``stage`` trains on: the model's splitter by default."""
        return self._make_splitter(**splitter_kwargs)

    # -- the one training path -----------------------------------------------------------------
    def train(
        self,
        max_epochs: int | None = None,
        *,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        batch_size: int | None = None,
        early_stopping: bool | None = None,
        restore_best_weights: bool | None = None,
        seed: int | None = None,
        plan_kwargs: dict[str, Any] | None = None,
        datasplitter_kwargs: dict[str, Any] | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        resume_from: str | os.PathLike | None = None,
        **kwargs,
    ) -> None:
        """Train the model, then calibrate its confidence and novelty threshold.

        Every celltyper model trains through this method. A model that trains in stages
        (see its docstring) runs each stage through scvi-tools' ``TrainRunner`` in turn.

        Parameters
        ----------
        max_epochs
            Epochs of every stage; ``None`` uses the model's default for each stage, or
            scvi-tools' heuristic from the number of cells (``min(400, 20000 / n * 400)``)
            where the model declares none.
        accelerator, devices
            As in scvi-tools (``"auto"``, ``"cpu"``, ``"gpu"``; a number or list of
            devices). Several devices (or ``num_nodes > 1``) need an explicit
            ``strategy``: ``strategy="ddp_find_unused_parameters_true"`` in a script or
            under ``torchrun``, ``"ddp_fork_find_unused_parameters_true"`` in a notebook;
            without one a ``ValueError`` says so. Under DDP each process reads its shard
            of every epoch in minibatches of ``batch_size`` (a step sees ``devices``
            times as many cells), early stopping is off (as in scvi-tools), the history
            is rank 0's and every process ends with rank 0's weights. See the
            multi-device page of the documentation.
        train_size, validation_size
            Share of each labelled cell type used for training, or held out for early
            stopping and the novelty calibration (give one; they add up to 1).
        batch_size
            Cells per minibatch; ``None`` uses the model's default.
        early_stopping
            Stop a stage when its validation criterion has not improved for
            ``early_stopping_patience`` epochs; ``None`` uses the model's default.
        restore_best_weights
            End each stage with the weights of its best validation epoch; ``None`` uses
            the model's default.
        seed
            Seed of the split, the minibatches and the augmentations; defaults to the
            model's ``seed``. The caller's random state is restored afterwards.
        plan_kwargs
            Keywords of the training plans and of the module's loss (the method's
            hyperparameters, e.g. ``lr``); each stage takes those its plan accepts.
        datasplitter_kwargs
            Keywords of the data splitter (e.g. ``balance_classes``).
        checkpoint_dir
            Save a Lightning checkpoint (weights, optimizer, epoch) every
            ``checkpoint_every`` epochs, as ``<checkpoint_dir>/<stage>/last.ckpt``.
        checkpoint_every
            Epochs between checkpoints.
        resume_from
            A ``checkpoint_dir`` of an earlier, unfinished ``train()`` of a model built the
            same way: training continues from the last stage checkpointed there, at its
            epoch, with its optimizer state (the stages before it are not run again; their
            weights are in the checkpoint). Checkpoints are pickles: resume only from
            your own.
        **kwargs
            The model's own training options (see its docstring), hyperparameters
            accepted by ``plan_kwargs`` or settings of ``datasplitter_kwargs`` given by
            name, or keywords of scvi-tools' and
            Lightning's ``Trainer`` (``strategy``, ``num_nodes``, ``callbacks``,
            ``logger``, ``enable_progress_bar``, ``early_stopping_patience``, ...). Any
            other name raises a ``TypeError`` that lists the valid ones.
        """
        options, plan_kwargs, splitter_kwargs, trainer_kwargs = self._route_train_kwargs(
            kwargs, plan_kwargs, datasplitter_kwargs
        )
        check_distributed_strategy(
            accelerator,
            devices,
            trainer_kwargs.get("strategy"),
            trainer_kwargs.get("num_nodes", 1),
        )
        stages = self._training_stages(options)
        shared = {
            "validation_size": self._resolve_validation_size(train_size, validation_size),
            "batch_size": self._train_defaults["batch_size"] if batch_size is None else batch_size,
            "seed": self._resolve_seed(seed),
        }
        if early_stopping is None:
            early_stopping = self._train_defaults["early_stopping"]
        if restore_best_weights is None:
            restore_best_weights = self._train_defaults.get("restore_best_weights", True)
        # Every stage's epochs are checked before the first stage trains.
        epochs = [self._stage_epochs(stage, max_epochs, options) for stage in stages]
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}.")
        resume = _resume_points(stages, resume_from)
        self.training_interrupted_ = False
        for index, (stage, stage_epochs) in enumerate(zip(stages, epochs, strict=True)):
            if self.training_interrupted_:
                break
            if resume and index < min(resume):
                continue  # its weights are in the later stage's checkpoint
            stage_trainer_kwargs = dict(trainer_kwargs)
            if checkpoint_dir is not None:
                stage_trainer_kwargs["callbacks"] = [
                    *(trainer_kwargs.get("callbacks") or []),
                    _stage_checkpoint(checkpoint_dir, stage, checkpoint_every),
                ]
            if index in resume:
                stage_trainer_kwargs["ckpt_path"] = resume[index]
            self._run_stage(
                stage,
                max_epochs=stage_epochs,
                shared=shared,
                plan_kwargs=plan_kwargs,
                datasplitter_kwargs=splitter_kwargs,
                accelerator=accelerator,
                devices=devices,
                early_stopping=early_stopping,
                restore_best_weights=restore_best_weights,
                trainer_kwargs=stage_trainer_kwargs,
            )
        # A query fine-tuned without labelled cells keeps the reference's threshold.
        if self.is_trained_ and not self._is_query_model:
            self._record_reference_genes()
        if self.is_trained_ and self.n_labels and self._n_labelled_cells() > 0:
            self.calibrate_confidence()
            self.calibrate_novelty()
        if self.training_interrupted_:
            self._warn_interrupted()

    def _route_train_kwargs(
        self,
        kwargs: dict[str, Any],
        plan_kwargs: dict[str, Any] | None,
        datasplitter_kwargs: dict[str, Any] | None,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Split ``train()``'s keywords into stage options, plan, splitter and trainer
        keywords, in that order of precedence; an unknown name raises a TypeError."""
        options = dict(self._train_options)
        plan = dict(plan_kwargs or {})
        splitter = dict(datasplitter_kwargs or {})
        trainer: dict[str, Any] = {}
        plan_names = self._plan_parameter_names()
        splitter_names = self._splitter_parameter_names()
        trainer_names = trainer_parameters()
        unknown = sorted(set(plan) - plan_names)
        for name, value in kwargs.items():
            if name in options:
                options[name] = value
            elif name in plan_names:
                plan[name] = value
            elif name in splitter_names:
                splitter[name] = value
            elif name in trainer_names:
                trainer[name] = value
            else:
                unknown.append(name)
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.train() got unexpected keyword arguments {unknown}. "
                f"Training options: {sorted(options) or 'none'}; hyperparameters (also as "
                f"plan_kwargs): {sorted(plan_names)}; data splitter settings (also as "
                f"datasplitter_kwargs): {sorted(splitter_names)}; any keyword of scvi-tools' "
                "or Lightning's Trainer."
            )
        return options, plan, splitter, trainer

    @classmethod
    def _plan_parameter_names(cls) -> set[str]:
        """Hyperparameters of every plan this model may train with."""
        plans = {cls._training_plan_cls, *cls._extra_plan_classes()}
        names: set[str] = set()
        for plan_cls in plans:
            names |= plan_parameters(plan_cls, cls._module_cls)
        return names - cls._computed_plan_arguments()

    @classmethod
    def _splitter_parameter_names(cls) -> set[str]:
        """Settings of the model's data splitter that users may pass."""
        return _keyword_names(cls._data_splitter_cls.__init__) - _SPLITTER_INTERNALS

    @classmethod
    def train_keywords(cls) -> dict[str, list[str]]:
        """The keyword arguments :meth:`train` accepts, by kind, without building a model.

        Returns
        -------
        ``{"train": ..., "options": ..., "hyperparameters": ..., "splitter": ...,
        "trainer": ...}``, each a sorted list of names: ``train()``'s own parameters, the
        model's training options, the plans' and loss's hyperparameters, the data
        splitter's settings and the keywords of scvi-tools' and Lightning's ``Trainer``.
        A name may appear under several kinds; ``train()`` routes it to the first.
        """
        own = _keyword_names(cls.train) - {"self"}
        return {
            "train": sorted(own),
            "options": sorted(cls._train_options),
            "hyperparameters": sorted(cls._plan_parameter_names()),
            "splitter": sorted(cls._splitter_parameter_names()),
            "trainer": sorted(trainer_parameters()),
        }

    @classmethod
    def _extra_plan_classes(cls) -> tuple[type, ...]:
        """Plans of stages other than ``_training_plan_cls`` (for keyword checking)."""
        return ()

    @classmethod
    def _computed_plan_arguments(cls) -> set[str]:
        """Plan arguments the model computes itself, which users cannot pass."""
        return set()

    def _resolve_validation_size(
        self, train_size: float | None, validation_size: float | None
    ) -> float:
        if train_size is None and validation_size is None:
            return float(self._train_defaults["validation_size"])
        if validation_size is None:
            validation_size = 1.0 - float(train_size)
        if train_size is not None and abs(float(train_size) + validation_size - 1.0) > 1e-9:
            raise ValueError(
                f"train_size ({train_size}) and validation_size ({validation_size}) must add "
                "up to 1: every labelled cell is used for one or the other."
            )
        if not 0.0 <= validation_size < 1.0:
            raise ValueError(f"validation_size must be in [0, 1), got {validation_size}.")
        return float(validation_size)

    def _stage_epochs(
        self, stage: TrainingStage, max_epochs: int | None, options: dict[str, Any]
    ) -> int:
        epochs = options.get(stage.epochs_option) if stage.epochs_option else None
        if epochs is None:
            epochs = max_epochs
        if epochs is None:
            epochs = stage.max_epochs
        if epochs is None:
            epochs = get_max_epochs_heuristic(self.adata.n_obs)
        if int(epochs) != epochs or epochs < 1:
            name = stage.epochs_option if stage.epochs_option in options else "max_epochs"
            raise ValueError(f"{name} must be a whole number >= 1, got {epochs!r}.")
        return int(epochs)

    def _run_stage(  # a model may extend it around super()._run_stage (SCPRETRAIN)
        self,
        stage: TrainingStage,
        *,
        max_epochs: int,
        shared: dict[str, Any],
        plan_kwargs: dict[str, Any],
        datasplitter_kwargs: dict[str, Any],
        accelerator,
        devices,
        early_stopping: bool,
        restore_best_weights: bool,
        trainer_kwargs: dict[str, Any],
    ) -> None:
        """Fit one stage with scvi-tools' runner."""
        splitter_kwargs = {**shared, **stage.splitter_kwargs, **datasplitter_kwargs}
        datamodule = self._stage_data(stage, splitter_kwargs)
        accepted = plan_parameters(stage.plan_cls, self.module)
        plan = stage.plan_cls(
            self.module,
            **{
                **self._stage_plan_kwargs(stage, datamodule),
                **stage.plan_kwargs,
                **{k: v for k, v in plan_kwargs.items() if k in accepted},
            },
        )
        has_validation = getattr(datamodule, "n_val", 0) > 0
        if early_stopping and not has_validation:
            warnings.warn(
                f"No held-out labelled cells for stage {stage.name!r}: early stopping is off.",
                UserWarning,
                stacklevel=4,
            )
        callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
        if restore_best_weights and has_validation:
            callbacks.append(RestoreBestWeights(stage.monitor, stage.monitor_mode))
        # After RestoreBestWeights: every process ends with rank 0's weights and history.
        sync = SyncProcesses()
        callbacks.append(sync)
        if has_validation:
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        trainer_kwargs.setdefault("early_stopping_patience", stage.early_stopping_patience)
        trainer_kwargs.setdefault("min_epochs", min(stage.min_epochs, max_epochs))
        distributed = _is_distributed(trainer_kwargs.get("strategy"))
        log_dir = None
        if distributed and all(trainer_kwargs.get(k) is None for k in ("logger", "log_save_dir")):
            # Under DDP, scvi-tools' logger hands rank 0's history over in a file, by
            # default under the working directory: a folder of our own, removed after.
            log_dir = tempfile.mkdtemp(prefix="celltyper-ddp-history-")
            trainer_kwargs["log_save_dir"] = log_dir
        self._start_fresh_history()
        try:
            with warnings.catch_warnings():
                if not (early_stopping and has_validation):  # nothing was turned off
                    warnings.filterwarnings(
                        "ignore", "early_stopping was automatically disabled", UserWarning
                    )
                runner = TrainRunner(
                    self,
                    training_plan=plan,
                    data_splitter=datamodule,
                    max_epochs=max_epochs,
                    accelerator=accelerator,
                    devices=devices,
                    early_stopping=early_stopping and has_validation,
                    early_stopping_monitor=stage.monitor,
                    early_stopping_mode=stage.monitor_mode,
                    callbacks=callbacks,
                    **trainer_kwargs,
                )
            self._fit(stage, runner, max_epochs, shared["seed"])
        finally:
            if log_dir is not None:
                shutil.rmtree(log_dir, ignore_errors=True)
        if not runner.trainer.is_global_zero and sync.history is not None:
            self.history_ = sync.history  # scvi-tools fills it on rank 0 only
        if stage.keep_history_as:
            setattr(self, stage.keep_history_as, self.history_)

    def _fit(self, stage: TrainingStage, runner: TrainRunner, max_epochs: int, seed: int):
        """Run ``runner``; Ctrl+C or SIGTERM keep what the stage learnt."""
        sigint = signal.getsignal(signal.SIGINT)
        try:
            with seeded(seed):
                runner()
        except (KeyboardInterrupt, SystemExit) as interrupt:
            # Lightning turns Ctrl+C into SystemExit(1) (SIGTERM: SIGTERMException).
            if runner.trainer.state.status != TrainerStatus.INTERRUPTED:
                raise
            self._keep_interrupted_fit(stage, runner, max_epochs, interrupt)
        finally:
            # Lightning leaves Ctrl+C ignored after an interruption.
            signal.signal(signal.SIGINT, sigint)

    def _keep_interrupted_fit(
        self, stage: TrainingStage, runner: TrainRunner, max_epochs: int, interrupt
    ) -> None:
        """After Ctrl+C or SIGTERM: keep what the stage learnt, say so, train no further."""
        self.training_interrupted_ = True
        epochs_done = int(runner.trainer.current_epoch)
        self.is_trained_ = epochs_done > 0
        splitter = runner.data_splitter
        for name in ("train", "validation", "test"):
            indices = getattr(splitter, f"{'val' if name == 'validation' else name}_idx", None)
            if indices is not None:
                setattr(self, f"{name}_indices_", indices)
        # Lightning raises SystemExit while handling the KeyboardInterrupt (its context).
        causes = (type(interrupt).__name__, type(interrupt.__context__).__name__)
        kind = (
            "SIGTERM"
            if any("SIGTERM" in n or "Terminated" in n for n in causes)
            else ("KeyboardInterrupt")
        )
        restored = any(isinstance(c, RestoreBestWeights) for c in runner.trainer.callbacks)
        kept = "the best weights seen so far" if restored else "the weights of the last step"
        self._interruption = (
            f"Training interrupted ({kind}) in stage {stage.name!r} after {epochs_done} of "
            f"{max_epochs} epochs; later stages did not run. The model keeps {kept}"
        )

    def _warn_interrupted(self) -> None:
        state = (
            "and is usable. Call train() again to train further."
            if self.is_trained_
            else "but is not trained: call train() again."
        )
        warnings.warn(f"{self._interruption} {state}", UserWarning, stacklevel=3)

    def _start_fresh_history(self) -> None:
        """Forget the curves of the previous fit before a stage.

        scvi's runner appends a trained model's new curves to the old ones and drops the
        curves the old history lacks, so each stage starts from an empty history; the
        runner sets ``is_trained_`` again at its end.
        """
        self.history_ = None
        self.is_trained_ = False
