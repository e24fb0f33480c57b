"""scNym's training plan: the ramps of the MixMatch and adversary weights."""

from __future__ import annotations

from celltyper.nn import linear_ramp, sigmoid_ramp

from ._base import CellTyperTrainingPlan, OptimizerName


class MixMatchTrainingPlan(CellTyperTrainingPlan):
    """Trains :class:`~celltyper.module.SCNYMModule` on its MixMatch and adversary loss.

    The objective lives in the module's ``loss``, whose keywords (``sharpen_temperature``,
    ``mixup_alpha``, ``pseudolabel_min_confidence``, ...) this plan accepts and passes on.
    What only a plan can do stays here: the weights of the unsupervised and adversarial
    terms ramp up with the epoch (linear and sigmoid ramps, as published), and are logged
    as ``unsup_weight`` and ``adversary_weight``.

    Parameters
    ----------
    module
        An :class:`~celltyper.module.SCNYMModule`.
    unsup_max_weight
        Final weight of the unsupervised (MixMatch) term.
    n_epochs_unsup_ramp
        Epochs of the linear ramp of the unsupervised weight. The paper's is 100; early
        stopping usually ends training before that, so 40 lets the MixMatch term reach
        its full weight (docs: SCNYM, "Unsupervised ramp").
    adversary_max_weight
        Final weight of the adversarial term (0 disables the adversary). The paper's is
        0.1; 0.3 measured as well or better on every shared task and made the model
        insensitive to the HVG flavour (docs: SCNYM, "Adversary weight").
    n_epochs_adversary_ramp
        Epochs of the sigmoid ramp of the adversarial weight.
    optimizer, lr, weight_decay
        Optimizer settings (scNym: Adadelta, 1.0, 1e-4).
    **loss_kwargs
        Keywords of :meth:`~celltyper.module.SCNYMModule.loss`.
    """

    scheduled_loss_arguments = ("unsup_weight", "adversary_weight")

    def __init__(
        self,
        module,
        *,
        unsup_max_weight: float = 1.0,
        n_epochs_unsup_ramp: float = 40,
        adversary_max_weight: float = 0.3,
        n_epochs_adversary_ramp: float = 20,
        optimizer: OptimizerName = "Adadelta",
        lr: float = 1.0,
        weight_decay: float = 1e-4,
        **loss_kwargs,
    ):
        super().__init__(
            module, optimizer=optimizer, lr=lr, weight_decay=weight_decay, **loss_kwargs
        )
        self.unsup_max_weight = unsup_max_weight
        self.n_epochs_unsup_ramp = n_epochs_unsup_ramp
        self.adversary_max_weight = adversary_max_weight
        self.n_epochs_adversary_ramp = n_epochs_adversary_ramp

    def unsup_weight(self, epoch: float) -> float:
        return linear_ramp(epoch, self.n_epochs_unsup_ramp, self.unsup_max_weight)

    def adversary_weight(self, epoch: float) -> float:
        return sigmoid_ramp(epoch, self.n_epochs_adversary_ramp, self.adversary_max_weight)

    def scheduled_loss_kwargs(self, batch_idx: int) -> dict[str, float]:
        epoch = self.epoch_progress(batch_idx)
        return {
            "unsup_weight": self.unsup_weight(epoch),
            "adversary_weight": self.adversary_weight(epoch),
        }
