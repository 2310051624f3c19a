"""The SAFN model with its loss (model) and how it is trained and evaluated locally (train)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from safn_core.config.base import Section


class ModelConfig(Section):
    """The SAFN model and its loss (docs/model.md); every ablation is a switch here.

    Ablations: ``cross_attention: false`` (tokens skip the cross-attention, FFN sublayer only),
    ``sparsity_lambda: 0`` (no entropy penalty on the gate), ``loss: ce`` (plain cross-entropy),
    ``gate: sparsemax | entmax15`` (sparse gates with exact zeros). The paper's SAFN is
    ``wide: off`` with ``ensemble_size: 1`` (and ``train.select: val_loss``); the defaults add the
    wide path and 8 ensemble members, chosen by benchmarks/safn_quality.py (issue #27).
    """

    d_model: int = Field(64, ge=1, description="token width D of every modality encoder")
    n_heads: int = Field(4, ge=1, description="attention heads; must divide d_model")
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    encoder_hidden: int = Field(128, ge=1, description="hidden width of each modality encoder")
    ffn_hidden: int = Field(128, ge=0, description="hidden width of the attention blocks' FFN; "
                                                   "0 = no FFN sublayer")
    cross_attention: bool = Field(
        True, description="false = ablation 'no cross-attention' (FFN sublayer only)")
    gate: Literal["softmax", "sparsemax", "entmax15"] = "softmax"
    sparsity_lambda: float = Field(
        0.01, ge=0.0, description="weight of the mean gate entropy; 0 = no sparsity penalty")
    loss: Literal["cb_focal", "ce"] = "cb_focal"
    head: Literal["softmax", "ordinal"] = Field(
        "softmax", description="the output head for K > 2 classes: softmax (multi-class, the "
                               "default: ahead of ordinal in macro ROC-AUC on both ordered "
                               "targets, benchmarks/severity.py) or ordinal (cumulative link, "
                               "proportional odds: one score and K-1 ordered thresholds; only "
                               "for an ordered target); a binary target has one head")
    focal_gamma: float = Field(1.5, ge=0.0)
    cb_beta: float = Field(0.999, ge=0.0, lt=1.0, description="class-balanced beta, in [0, 1)")
    head_hidden: int = Field(64, ge=1, description="hidden width of the classification head")
    numeric_embedding: Literal["none", "periodic"] = Field(
        "none", description="per-feature input embedding of the modality encoders: periodic = "
                            "PLR(lite), Gorishniy et al. 2022 (safn_core.model.embeddings)")
    n_frequencies: int = Field(16, ge=1, description="periodic embedding: frequencies k per "
                                                     "feature")
    frequency_sigma: float = Field(0.1, gt=0, description="periodic embedding: SD of the "
                                                          "initial frequencies")
    embedding_dim: int = Field(8, ge=1, description="periodic embedding: width d_e per feature")
    linear_path: bool = Field(False, description="add a gated linear path from each "
                              "modality's features to the logits (wide and deep)")
    wide: Literal["off", "trained", "frozen"] = Field(
        "trained", description="the wide path: one ungated linear layer from all features to the "
                               "logits, added to every member's deep logits and set to the exact "
                               "logistic regression before training (safn_core.logistic; "
                               "fit_by_rounds), the deep output starting at zero, so the "
                               "untrained model IS that regression (round/epoch 0). off = no wide "
                               "path (the paper's SAFN); trained = it trains with the rest, with "
                               "its own decay train.wide_weight_decay (the default lets the "
                               "regression fade as the deep path takes over); frozen = it stays "
                               "the regression and only the deep path trains")

    @field_validator("wide", mode="before")
    @classmethod
    def _off_is_off(cls, value):
        """YAML reads a bare ``off`` (``--set model.wide=off``, ``wide: off``) as false."""
        return "off" if value is False else value

    feature_lasso: float = Field(
        0.0, ge=0.0, description="group-lasso strength λ on each feature's first-layer weights "
                                 "of the deep path, applied as a proximal step after every "
                                 "optimizer step (safn_core.model.feature_sparsity): features "
                                 "whose weights reach zero are no longer read by the deep path; "
                                 "0 = off")
    feature_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="probability that a "
                                   "feature is zeroed (its training mean) in training")
    feature_noise: float = Field(0.0, ge=0.0, description="SD of Gaussian noise added to every "
                                 "scaled feature in training (0 = none)")
    ensemble_size: int = Field(8, ge=1, le=64, description="k ensemble members sharing every "
                               "weight but an input adapter and the output layer (TabM-mini); "
                               "1 = a single model (the paper's)")

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must divide model.d_model ({self.d_model}); "
                f"e.g. d_model {self.n_heads * max(1, round(self.d_model / self.n_heads))} "
                f"or n_heads 1")
        return self


class TrainConfig(Section):
    """Local training of SAFN (every engine) and the centralised evaluation (`safn-train`)."""

    seed: int = 0
    max_epochs: int = Field(150, ge=1, description="upper bound; early stopping usually ends sooner")
    patience: int = Field(15, ge=1, description="epochs without validation improvement to stop")
    select: Literal["val_loss", "val_roc_auc", "val_loss_calibrated", "last"] = Field(
        "val_loss", description="what early stopping keeps (centralised fits): the epoch with the "
                                "lowest validation loss or the highest validation ROC-AUC; "
                                "val_loss_calibrated = the lowest class-balanced validation log "
                                "loss at its best temperature (blind to the logits' scale, which "
                                "temperature scaling sets afterwards); last = no early stopping, "
                                "train.max_epochs epochs")
    round0_margin: float = Field(
        0.0, ge=0, description="with a wide path, a trained epoch replaces epoch 0 (the "
                               "logistic regression) only if its validation loss is lower by "
                               "more than this many standard errors of the paired "
                               "per-participant difference (centralised fits, select val_loss "
                               "or val_loss_calibrated); 0 = the plain rule")
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="cosine: the learning rate decays from train.lr to about 0 over "
                                "the fit's planned epochs, stepped after every optimizer step "
                                "(centralised and comparator fits, fit_by_rounds; federated "
                                "sites keep train.lr)")
    warmup_epochs: int = Field(0, ge=0, description="linear warm-up of the learning rate over "
                                                    "the first epochs (either lr_schedule)")
    weight_decay: float = Field(1e-4, ge=0)
    wide_weight_decay: float | None = Field(
        30.0, ge=0, description="decoupled weight decay of a trained wide path (model.wide: "
                                "trained); null = train.weight_decay. A strong one lets the "
                                "logistic regression the model starts from fade unless the data "
                                "hold it up, so the deep path takes over where it can")
    weight_averaging: Literal["none", "ema"] = Field(
        "none", description="ema: validate, select and keep an exponential moving average of "
                            "the weights (centralised and comparator fits, fit_by_rounds)")
    ema_decay: float = Field(0.99, gt=0, lt=1, description="per-step decay of the ema weights")
    val_fraction: float = Field(0.2, gt=0, lt=0.5,
                                description="inner validation split for early stopping/threshold")
    temperature_scaling: bool = Field(
        True, description="fit a temperature T on the validation split's logits after early "
                          "stopping (safn-train's folds and bundle): p = σ(z/T), rankings kept")
    decision_rule: Literal["argmax", "cutpoints"] = Field(
        "argmax", description="K > 2 classes: the class safn-train's bundle predicts: the most "
                              "probable (argmax) or, for an ordered target, the class between "
                              "cut points on the expected class index fitted on the final "
                              "fit's validation split to maximise QWK; binary targets use the "
                              "threshold")
    folds: int = Field(5, ge=2)
    repeats: int = Field(3, ge=1)
    workers: int = Field(2, ge=1, description="parallel fold fits (processes)")
    feature_sets: list[Literal["all", "no_motor", "imaging_demographics"]] = Field(
        default_factory=lambda: ["all", "no_motor", "imaging_demographics"])
    baselines: list[Literal["majority", "logistic_regression", "exact_logistic_regression",
                            "random_forest", "hist_gradient_boosting",
                            "hist_gradient_boosting_es", "mlp", "ordinal_logistic"]] = Field(
        default_factory=lambda: ["majority", "logistic_regression", "exact_logistic_regression",
                                 "random_forest", "hist_gradient_boosting",
                                 "hist_gradient_boosting_es", "mlp", "ordinal_logistic"],
        description="baselines fitted on the same folds; ordinal_logistic (proportional odds) "
                    "only for an ordered target of K > 2 classes, skipped otherwise")
    ablations: list[Literal["no_cross_attention", "no_sparsity", "plain_ce"]] = Field(
        default_factory=lambda: ["no_cross_attention", "no_sparsity", "plain_ce"])
    modality_drop: bool = Field(True, description="modality-drop ablation at test time")

    @model_validator(mode="after")
    def _warmup_shorter_than_training(self) -> "TrainConfig":
        if self.warmup_epochs >= self.max_epochs:
            raise ValueError(f"train.warmup_epochs ({self.warmup_epochs}) must be smaller than "
                             f"train.max_epochs ({self.max_epochs}): the warm-up would take the "
                             "whole training")
        return self
