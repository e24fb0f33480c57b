"""scAtlasVAE's torch module: batch-invariant encoder, batch-conditioned decoder, label heads."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
from scvi.module.base import LossOutput, auto_move_data
from scvi.nn import Encoder
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from celltyper.nn import CovariateDecoder, group_mmd, log1p_normalize

from ._base import (
    CellTyperModule,
    EncoderGeneMask,
    SparseRows,
    fc_layers_first_linear,
    sparse_log_values,
    sparse_product,
)

Likelihood = Literal["zinb", "nb", "mse"]


def extra_labels_registry_key(index: int) -> str:
    """Registry key of the ``index``-th label key (0 is scvi's ``labels``)."""
    return REGISTRY_KEYS.LABELS_KEY if index == 0 else f"{REGISTRY_KEYS.LABELS_KEY}_{index}"


class SCATLASVAEModule(EncoderGeneMask, CellTyperModule):
    """VAE of scAtlasVAE (Xue et al. 2024) with one linear cell-type head per label key.

    The encoder reads ``log1p(x)`` (optionally ``log1p`` of counts scaled to
    ``target_sum``), never a batch, and returns the mean and variance of ``z``. The decoder
    reads ``z`` and one learned representation per categorical covariate (the batch first)
    and returns gene proportions; the mean is proportions x observed library size.

    Parameters
    ----------
    n_input
        Number of genes.
    n_categories
        Categories of each covariate: the batch key first, then further covariates.
    n_labels_per_key
        Cell types of each label key (empty for an unsupervised atlas).
    n_hidden
        Width of the encoder's and decoder's hidden layers.
    n_layers
        Hidden layers of the encoder and of the decoder.
    n_latent
        Dimension of ``z``.
    dropout_rate
        Dropout after each hidden layer.
    covariate_representation
        ``"embedding"`` (learned vectors of ``embedding_dim``) or ``"one-hot"``.
    embedding_dim
        Length of the learned covariate vectors.
    likelihood
        ``"zinb"``, ``"nb"``, or ``"mse"`` (squared error between ``log1p(x)`` and
        ``log1p`` of the decoded mean).
    target_sum
        When set, the encoder reads ``log1p(x / total * target_sum)`` (normalize_total).
    head_weights
        Weight of each label key's cross-entropy.
    mmd_covariate
        Index of the covariate whose groups the optional MMD penalty aligns in ``z``.
    """

    def __init__(
        self,
        n_input: int,
        n_categories: Sequence[int],
        n_labels_per_key: Sequence[int] = (),
        n_hidden: int = 128,
        n_layers: int = 1,
        n_latent: int = 10,
        dropout_rate: float = 0.1,
        covariate_representation: Literal["embedding", "one-hot"] = "embedding",
        embedding_dim: int = 8,
        likelihood: Likelihood = "zinb",
        target_sum: float | None = None,
        head_weights: Sequence[float] | None = None,
        mmd_covariate: int = 0,
    ):
        super().__init__()
        if likelihood not in ("zinb", "nb", "mse"):
            raise ValueError(f"likelihood must be 'zinb', 'nb' or 'mse', got {likelihood!r}.")
        n_labels_per_key = [int(n) for n in n_labels_per_key]
        head_weights = [1.0] * len(n_labels_per_key) if head_weights is None else head_weights
        if len(head_weights) != len(n_labels_per_key):
            raise ValueError(
                f"head_weights needs one weight per label key ({len(n_labels_per_key)}), got "
                f"{len(head_weights)}."
            )
        if not 0 <= mmd_covariate < len(n_categories):
            raise ValueError(f"mmd_covariate must index one of {len(n_categories)} covariates.")
        self.n_input = n_input
        self.n_latent = n_latent
        self.likelihood = likelihood
        self.target_sum = target_sum
        self.n_labels_per_key = n_labels_per_key
        self.n_labels = n_labels_per_key[0] if n_labels_per_key else 0
        self.head_weights = [float(w) for w in head_weights]
        self.mmd_covariate = mmd_covariate
        self.encoder = Encoder(
            n_input,
            n_latent,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            use_batch_norm=True,
            use_layer_norm=False,
            activation_fn=nn.ReLU,
            var_eps=1e-4,
        )
        self.decoder = CovariateDecoder(
            n_latent,
            n_input,
            n_categories,
            n_hidden=n_hidden,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            representation=covariate_representation,
            embedding_dim=embedding_dim,
            dispersion=likelihood != "mse",
            zero_inflation=likelihood == "zinb",
        )
        self.heads = nn.ModuleList([nn.Linear(n_latent, n) for n in n_labels_per_key])
        for k, n in enumerate(n_labels_per_key):
            # N / n_c, set from the reference's labels by the model (buffers travel with
            # the state dict, so a query model keeps the reference's weights).
            self.register_buffer(f"class_weights_{k}", torch.ones(n))
        # Rows of each covariate table that the reference was trained with; surgery freezes
        # them. Loaded from the reference's state dict by scvi-tools' ArchesMixin.
        self.register_buffer(
            "n_reference_categories", torch.tensor([int(n) for n in n_categories])
        )
        # The decoder still reconstructs the genes the encoder leaves out.
        self.register_encoder_genes(n_input)

    # -- inputs -------------------------------------------------------------------------
    @property
    def n_label_keys(self) -> int:
        return len(self.n_labels_per_key)

    def class_weights(self, k: int) -> Tensor:
        return getattr(self, f"class_weights_{k}")

    def set_class_weights(self, k: int, codes: Tensor) -> None:
        """Set head ``k``'s class weights to ``N / n_c`` from the reference's label codes.

        Codes of ``n_labels_per_key[k]`` and above are unlabelled cells; absent classes
        get 0.
        """
        codes = torch.as_tensor(codes).reshape(-1).long()
        n_types = self.n_labels_per_key[k]
        counts = torch.bincount(codes[codes < n_types], minlength=n_types).double()
        weights = torch.where(counts > 0, counts.sum() / counts, torch.zeros_like(counts))
        self.class_weights(k).copy_(weights.float())

    def encoder_input(self, x: Tensor) -> Tensor:
        """``log1p`` of the counts, after scaling to ``target_sum`` when set; genes outside
        ``encoder_genes`` are 0."""
        if self.target_sum is None:
            values = torch.log1p(x)
        else:
            values = log1p_normalize(x, self.target_sum)
        return values * self.encoder_genes

    @staticmethod
    def covariate_codes(tensors: dict[str, Tensor]) -> list[Tensor]:
        """Batch codes, then the codes of each extra categorical covariate."""
        codes = [tensors[REGISTRY_KEYS.BATCH_KEY].view(-1).long()]
        extra = tensors.get(REGISTRY_KEYS.CAT_COVS_KEY)
        if extra is not None:
            codes += [extra[:, i].long() for i in range(extra.shape[1])]
        return codes

    def label_codes(self, tensors: dict[str, Tensor], k: int) -> Tensor:
        return tensors[extra_labels_registry_key(k)].view(-1).long()

    # -- inference on sparse rows ------------------------------------------------------
    def reads_sparse_rows(self) -> bool:
        """Whether inference may hand this module :class:`SparseRows` expression: the
        encoder opens with a linear layer, applied to the stored entries only."""
        return fc_layers_first_linear(self.encoder.encoder) is not None

    def expression(self, tensors: dict[str, Tensor]) -> Tensor:
        """The expression matrix of a minibatch (:class:`SparseRows` densified, for the
        outputs that read every gene: decoding, interpretation)."""
        x = tensors[REGISTRY_KEYS.X_KEY]
        if isinstance(x, SparseRows):
            return torch.from_numpy(x.matrix.toarray()).to(self.encoder.mean_encoder.weight)
        return x

    def _sparse_latent_mean(self, rows: SparseRows) -> Tensor:
        """The encoder's mean for sparse rows: the opening layer multiplies the stored
        entries of ``encoder_input``; equal to the dense path to rounding."""
        first, rest = fc_layers_first_linear(self.encoder.encoder)
        weight = first.weight * self.encoder_genes
        hidden = sparse_product(sparse_log_values(rows.matrix, self.target_sum), weight)
        if first.bias is not None:
            hidden = hidden + first.bias
        return self.encoder.mean_encoder(rest(hidden))

    # -- CellTyperModule interface -----------------------------------------------------
    @auto_move_data
    def embed(self, tensors: dict[str, Tensor]) -> Tensor:
        x = tensors[REGISTRY_KEYS.X_KEY]
        if isinstance(x, SparseRows):
            return self._sparse_latent_mean(x)
        qz_m, _, _ = self.encoder(self.encoder_input(self.expression(tensors)))
        return qz_m

    @auto_move_data
    def classify(self, tensors: dict[str, Tensor]) -> Tensor:
        return self.classify_key(tensors, 0)

    @auto_move_data
    def embed_and_classify(self, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        if self.n_label_keys == 0:
            return self.embed(tensors), self.classify(tensors)  # raises: no head
        z = self.embed(tensors)
        return z, self.heads[0](z)

    @auto_move_data
    def classify_key(self, tensors: dict[str, Tensor], k: int) -> Tensor:
        """Logits of label key ``k`` (0 is the primary key)."""
        if not 0 <= k < self.n_label_keys:
            raise ValueError(f"The module has {self.n_label_keys} label heads; got head {k}.")
        return self.heads[k](self.embed(tensors))

    @auto_move_data
    def decode_mean(
        self, tensors: dict[str, Tensor], batch_code: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Gene proportions decoded from the latent mean, and the observed library sizes.

        ``batch_code`` decodes every cell as if it came from that batch.
        """
        inference = self.inference(self.expression(tensors))
        codes = self.covariate_codes(tensors)
        if batch_code is not None:
            codes[0] = torch.full_like(codes[0], batch_code)
        return self.decoder(inference["qz_m"], codes)["scale"], inference["library"]

    def load_atlas_weights(
        self,
        atlas_state: dict[str, Tensor],
        atlas_categories: Sequence[Sequence],
        categories: Sequence[Sequence],
    ) -> None:
        """Copy a trained module's weights, its label heads excepted.

        The rows of covariate table ``i`` are matched by category name, from
        ``atlas_categories[i]`` to this module's ``categories[i]``; rows of categories the
        atlas never saw keep their initialisation.
        """
        target = self.state_dict()
        for name, value in atlas_state.items():
            if name.startswith(("heads.", "class_weights_")) or name == "n_reference_categories":
                continue
            if name.startswith("decoder.covariates."):
                i = int(name.split(".")[2])
                row = {str(c): r for r, c in enumerate(atlas_categories[i])}
                for j, category in enumerate(categories[i]):
                    if str(category) in row:
                        target[name][j] = value[row[str(category)]]
            elif target[name].shape != value.shape:
                raise ValueError(f"Architecture differs at {name}: pass the same init arguments.")
            else:
                target[name] = value.clone()
        self.load_state_dict(target)

    def covariate_tables(self) -> list[nn.Module]:
        return list(self.decoder.covariates)

    def query_trainable_parameters(self) -> Iterable[str]:
        # scArches for scAtlasVAE: only the covariate tables learn, and of those only the
        # rows of the query's new categories (see freeze_for_query).
        for i, _ in enumerate(self.decoder.covariates):
            yield f"decoder.covariates.{i}.weight"

    def freeze_for_query(self, unfrozen: bool = False) -> list[str]:
        """Freeze the reference: only the new rows of the covariate tables stay trainable.

        The first ``n_reference_categories[i]`` rows of table ``i`` are the reference's and
        get no gradient; ``unfrozen=True`` trains every parameter. Afterwards the module
        counts all its current categories as reference ones, so that a later surgery on
        top of this model freezes them too.
        """
        trainable = super().freeze_for_query(unfrozen=unfrozen)
        n_reference = [0 if unfrozen else int(n) for n in self.n_reference_categories]
        self.decoder.freeze_leading_rows(n_reference)
        with torch.no_grad():
            self.n_reference_categories.copy_(
                torch.tensor([t.num_embeddings for t in self.decoder.covariates])
            )
        return trainable

    # -- interpretation: the primary head on the encoder's input ---------------------------
    not_interpretable_reason = None

    def interpretation_input(self, tensors: dict[str, Tensor]) -> Tensor:
        """``log1p`` of the (normalised) counts, the values the encoder reads."""
        return self.encoder_input(self.expression(tensors))

    def logits_from_interpretation_input(self, x: Tensor) -> Tensor:
        """Logits of the primary label key's head on the latent mean of ``x``."""
        qz_m, _, _ = self.encoder(x)
        return self.heads[0](qz_m)

    # -- BaseModuleClass interface -----------------------------------------------------
    def _get_inference_input(self, tensors: dict[str, Tensor], **kwargs) -> dict[str, Tensor]:
        return {"x": self.expression(tensors)}

    def _get_generative_input(self, tensors, inference_outputs) -> dict:
        return {
            "z": inference_outputs["z"],
            "library": inference_outputs["library"],
            "codes": self.covariate_codes(tensors),
        }

    @auto_move_data
    def inference(self, x: Tensor) -> dict[str, Tensor]:
        qz_m, qz_v, z = self.encoder(self.encoder_input(x))
        # The decoder's mean is scaled by the observed library size.
        library = x.sum(dim=1, keepdim=True)
        return {"qz_m": qz_m, "qz_v": qz_v, "z": z, "library": library}

    @auto_move_data
    def generative(self, z: Tensor, library: Tensor, codes: list[Tensor]) -> dict[str, Tensor]:
        out = self.decoder(z, codes)
        out["rate"] = out["scale"] * library
        return out

    def reconstruction_loss(self, x: Tensor, generative_outputs: dict[str, Tensor]) -> Tensor:
        """Negative log-likelihood (or squared error) per cell, summed over genes."""
        rate = generative_outputs["rate"]
        if self.likelihood == "mse":
            return ((torch.log1p(x) - torch.log1p(rate)) ** 2).sum(dim=-1)
        theta = generative_outputs["dispersion"]
        if self.likelihood == "zinb":
            dist = ZeroInflatedNegativeBinomial(
                mu=rate, theta=theta, zi_logits=generative_outputs["zi_logits"]
            )
        else:
            dist = NegativeBinomial(mu=rate, theta=theta)
        return -dist.log_prob(x).sum(dim=-1)

    def prediction_loss(self, tensors: dict[str, Tensor], qz_m: Tensor) -> tuple[Tensor, dict]:
        """Weighted sum over label keys of the class-weighted cross-entropy.

        Cells unlabelled for a key (code >= its number of types) are masked out of that
        key's term, so they give it no gradient. The second output holds each key's
        unweighted cross-entropy, ``cross_entropy_<k>``.
        """
        total = qz_m.sum() * 0.0
        per_key = {}
        for k, head in enumerate(self.heads):
            labels = self.label_codes(tensors, k)
            labelled = labels < self.n_labels_per_key[k]
            if not labelled.any():
                per_key[f"cross_entropy_{k}"] = total.detach()
                continue
            ce = F.cross_entropy(
                head(qz_m[labelled]), labels[labelled], weight=self.class_weights(k)
            )
            per_key[f"cross_entropy_{k}"] = ce.detach()
            total = total + self.head_weights[k] * ce
        return total, per_key

    def loss(
        self,
        tensors: dict[str, Tensor],
        inference_outputs: dict[str, Tensor],
        generative_outputs: dict[str, Tensor],
        kl_weight: float = 1.0,
        prediction_weight: float = 1.0,
        mmd_weight: float = 0.0,
    ) -> LossOutput:
        """scAtlasVAE's objective: reconstruction + KL + cell-type heads + MMD.

        The reconstruction and KL terms are summed over genes / latent dimensions and
        averaged over cells; the cross-entropies are averaged over labelled cells.

        Parameters
        ----------
        tensors, inference_outputs, generative_outputs
            As in scvi-tools.
        kl_weight
            Weight of the KL term (the plan's warm-up, scvi-tools' ``kl_weight``).
        prediction_weight
            Weight of the heads' cross-entropies; at 0 the heads are left out of the graph,
            so the optimizer does not count steps for them before they join.
        mmd_weight
            Weight of the MMD between the groups of the module's MMD covariate (0: off).

        Returns
        -------
        ``LossOutput`` with scvi-tools' per-cell ``reconstruction_loss`` and ``kl_local``
        (for the ELBO metrics); ``extra_metrics`` hold the weighted terms
        ``reconstruction_term_loss``, ``kl_term_loss``, ``classification_loss`` (with label
        heads) and ``mmd_loss`` (with ``mmd_weight > 0``), which add up to the loss, and
        each label key's unweighted cross-entropy ``cross_entropy_<k>``.
        """
        x = self.expression(tensors)
        qz_m, qz_v = inference_outputs["qz_m"], inference_outputs["qz_v"]
        reconstruction = self.reconstruction_loss(x, generative_outputs)
        kl = kl_divergence(Normal(qz_m, qz_v.sqrt()), Normal(0.0, 1.0)).sum(dim=-1)
        terms = {
            "reconstruction_term_loss": reconstruction.mean(),
            "kl_term_loss": kl_weight * kl.mean(),
        }
        diagnostics: dict[str, Tensor] = {}
        if self.n_label_keys:
            prediction = qz_m.new_zeros(())
            if prediction_weight > 0:
                prediction, diagnostics = self.prediction_loss(tensors, qz_m)
            terms["classification_loss"] = prediction_weight * prediction
        if mmd_weight > 0:
            groups = self.covariate_codes(tensors)[self.mmd_covariate]
            terms["mmd_loss"] = mmd_weight * group_mmd(inference_outputs["z"], groups)
        return LossOutput(
            loss=sum(terms.values()),
            reconstruction_loss=reconstruction,
            kl_local=kl,
            extra_metrics={**terms, **diagnostics},
        )

    def validation_loss(self, tensors: dict[str, Tensor]) -> LossOutput:
        """The loss with the full KL weight, the heads and no MMD, and the primary head's
        ``accuracy`` on the labelled cells of the minibatch."""
        inference_outputs, _, loss_output = self.forward(tensors)
        if self.n_label_keys:
            labels = self.label_codes(tensors, 0)
            labelled = labels < self.n_labels
            if labelled.any():
                logits = self.heads[0](inference_outputs["qz_m"][labelled])
                correct = logits.argmax(dim=1) == labels[labelled]
                loss_output.extra_metrics["accuracy"] = correct.float().mean()
        return loss_output
