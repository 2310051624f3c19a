"""What a run does about sites that differ: ComBat harmonisation of the imaging features
(harmonisation) and a model of each site's own (personalisation)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from safn_core.config.base import Section


class HarmonisationConfig(Section):
    """ComBat harmonisation of the imaging features across sites (docs/harmonisation.md).

    Fitted on training data only: in a federation on every training site's training split from
    per-site sums (distributed ComBat), in ``safn-train`` inside each training fold with the site
    column as the batch. A site outside the fit (held-out, joining later, ``safn-validate`` at a
    new hospital) adjusts itself from its own participants with the global fit: no labels.
    """

    method: Literal["none", "combat"] = "none"
    modalities: list[str] | None = Field(
        None, description="modalities to harmonise (default: every imaging-side modality)")
    covariates: dict[str, Literal["continuous"] | list[str | int | float | bool]] = Field(
        default_factory=lambda: {"AGE": "continuous", "SEX": [0, 1]},
        description="effects ComBat preserves: column -> 'continuous' or its declared "
                    "categories (the first is the reference); never the diagnosis label")
    empirical_bayes: bool = Field(True, description="shrink each site's location and scale "
                                                    "across features (ComBat's empirical Bayes)")
    parametric: bool = Field(True, description="parametric priors (false: non-parametric)")

    @field_validator("covariates")
    @classmethod
    def _no_label(cls, value: dict) -> dict:
        for name in value:
            if name.lower() in ("label", "diagnosis", "dx"):
                raise ValueError(
                    f"'{name}' is the diagnosis; it can never be a ComBat covariate: applying the harmonisation would then need every participant's "
                    "diagnosis, the test participants' included (the answer the model is asked "
                    "for). Remove it; docs/harmonisation.md says what leaving it out costs")
        return value

    @property
    def enabled(self) -> bool:
        return self.method != "none"


class PersonalisationConfig(Section):
    """Every site keeps a model of its own beside the federation's (docs/personalisation.md).

    ``fine_tune``: after the federation, each training site trains the selected global model
    further on its own training split, for up to ``epochs`` epochs, and keeps the epoch (0, the
    global model itself, included) that its own validation split prefers by the run's
    ``federation.select`` rule. ``ditto`` (Li et al., ICML 2021): in every round each site also
    trains a personal model on its training split, pulled towards the round's global model by
    (λ/2)·‖v − w‖² (``ditto_lambda``), for ``federation.local_epochs`` epochs, and keeps the
    round its validation split prefers. The global training is unchanged by either. Personal
    models never leave the site (its state folder); only their test metrics do, under the same
    ``min_cell`` rule as every metric. A DP site trains its personal model with DP-SGD too, from
    the same ledger (the run's plan includes those steps).
    """

    method: Literal["none", "fine_tune", "ditto"] = "none"
    epochs: int = Field(10, ge=1, description="fine_tune: most epochs of local training after "
                                              "the federation (the best on the site's own "
                                              "validation split is kept, 0 included)")
    ditto_lambda: float = Field(0.1, ge=0, description="ditto: λ of the pull towards the "
                                                       "global model (0: local training only)")
    lr: float | None = Field(None, gt=0, description="learning rate of personal training "
                                                     "(default train.lr)")
    threshold: Literal["site", "global"] = Field(
        "site", description="the personal model's decision threshold: chosen on the site's own "
                            "validation split (site) or the federation's (global)")

    @property
    def enabled(self) -> bool:
        return self.method != "none"
