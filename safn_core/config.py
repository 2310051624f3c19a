"""The one configuration schema of safn: typed, validated at load, defaults in one place.

Every command reads a YAML file into `SafnConfig` (sections it does not use keep their defaults),
applies ``--set dotted.key=value`` overrides and validates the result. An unknown key, a wrong type
or a missing required field is a `ConfigError` that names the file and the dotted key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from safn_core.errors import ConfigError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(Section):
    """The built-in synthetic PPMI-style cohort (`safn-synth`).

    ``n_pd`` and ``n_hc`` count participants with all four modalities; the generator adds
    participants without MRI and SWEDD/prodromal participants around them, as a real download has.
    """

    seed: int = 0
    n_pd: int = Field(570, ge=2)
    n_hc: int = Field(133, ge=2)
    n_without_mri: int = Field(297, ge=0, description="PD/HC participants with no baseline MRI")
    n_swedd: int = Field(64, ge=0)
    n_prodromal: int = Field(65, ge=0)
    n_sites: int = Field(5, ge=1, le=200)
    site_size_alpha: float = Field(2.0, gt=0, description="Dirichlet concentration of site sizes")
    min_site_size: int = Field(40, ge=1, description="floor on complete participants per site")
    site_ratio_spread: float = Field(0.35, ge=0, description="SD of the site's PD/HC log-odds shift")
    scanner_effects: bool = True
    naming: Literal["2023", "legacy"] = "2023"
    per_site: bool = Field(False, description="write one download per site instead of one")


class DataConfig(Section):
    """Where a cohort comes from and how it is read."""

    source: Literal["synthetic", "ppmi", "table"] = "synthetic"
    path: Path | None = Field(None, description="PPMI download folder, or the CSV/Parquet table")
    mapping: Path | None = Field(None, description="YAML column mapping for source: table")
    exclude_motor: bool = Field(False, description="drop MDS-UPDRS I-III totals and H&Y")
    require_all_modalities: bool = Field(
        True, description="keep only participants with every modality (the paper's cohort)")
    normalise_volumes_by_etiv: bool = False
    min_cell: int = Field(5, ge=1, description="smallest group a statistic may describe")

    @model_validator(mode="after")
    def _path_needed(self) -> "DataConfig":
        if self.source in ("ppmi", "table") and self.path is None:
            raise ValueError(f"data.path is required when data.source is '{self.source}'")
        if self.source == "table" and self.mapping is None:
            raise ValueError("data.mapping is required when data.source is 'table'")
        return self


class ModelConfig(Section):
    """The SAFN model and its loss (docs/model.md); every ablation is a switch here.

    Ablations: ``cross_attention: false`` (tokens skip the cross-attention, FFN sublayer only),
    ``sparsity_lambda: 0`` (no entropy penalty on the gate), ``loss: ce`` (plain cross-entropy),
    ``gate: sparsemax | entmax15`` (sparse gates with exact zeros).
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
    feature_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="probability that a "
                                   "feature is zeroed (its training mean) in training")
    feature_noise: float = Field(0.0, ge=0.0, description="SD of Gaussian noise added to every "
                                 "scaled feature in training (0 = none)")
    ensemble_size: int = Field(1, ge=1, le=64, description="k ensemble members sharing every "
                               "weight but an input adapter (TabM-mini); 1 = a single model")

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
    select: Literal["val_loss", "val_roc_auc", "last"] = Field(
        "val_loss", description="what early stopping keeps (centralised fits): the epoch with the "
                                "lowest validation loss or the highest validation ROC-AUC; last = "
                                "no early stopping, train.max_epochs epochs")
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
    weight_averaging: Literal["none", "ema"] = Field(
        "none", description="ema: validate, select and keep an exponential moving average of "
                            "the weights (centralised and comparator fits, fit_by_rounds)")
    ema_decay: float = Field(0.99, gt=0, lt=1, description="per-step decay of the ema weights")
    val_fraction: float = Field(0.2, gt=0, lt=0.5,
                                description="inner validation split for early stopping/threshold")
    temperature_scaling: bool = Field(
        True, description="fit a temperature T on the validation split's logits after early "
                          "stopping (safn-train's folds and bundle): p = σ(z/T), rankings kept")
    folds: int = Field(5, ge=2)
    repeats: int = Field(3, ge=1)
    workers: int = Field(2, ge=1, description="parallel fold fits (processes)")
    feature_sets: list[Literal["all", "no_motor", "imaging_demographics"]] = Field(
        default_factory=lambda: ["all", "no_motor", "imaging_demographics"])
    baselines: list[Literal["majority", "logistic_regression", "random_forest",
                            "hist_gradient_boosting", "hist_gradient_boosting_es", "mlp"]] = Field(
        default_factory=lambda: ["majority", "logistic_regression", "random_forest",
                                 "hist_gradient_boosting", "hist_gradient_boosting_es", "mlp"])
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


class CentralDPConfig(Section):
    """Central DP (docs/privacy.md): each site's update clipped to ``clipping_norm`` and
    Gaussian noise on the average. Site-level DP for whoever receives the global model; no
    per-site ε. Without secure aggregation Flower's server-side fixed clipping does it (the
    coordinator sees the unnoised updates); with it the sites clip and the mean of the clipped
    updates, which is all the coordinator sees, gets the noise."""

    enabled: bool = False
    noise_multiplier: float = Field(
        1.0, gt=0, description="σ: noise std on the average is σ·clipping_norm / sites per round")
    clipping_norm: float = Field(
        1.0, gt=0, description="L2 bound on each site's update (new weights − global weights)")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the reported site-level ε")


class SecAggConfig(Section):
    """Bounds of secure aggregation's fixed-point encoding (docs/secure-aggregation.md): values
    beyond them are clipped at the site (the federation-wide clip count is reported); with them
    no 64-bit sum can overflow."""

    weight_bound: float = Field(1e3, gt=0, description="largest |model weight| a site sends")
    feature_bound: float = Field(1e9, gt=0, description="largest |feature value| (statistics)")
    max_site_examples: int = Field(100_000, ge=1, description="most participants at one site")
    max_attempts: int = Field(3, ge=1, le=10, description="aggregations redone after a dropout")


class FederationConfig(Section):
    """A federated run: strategy, rounds, local work, sites' splits (every engine)."""

    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi"] = "fedavg"
    rounds: int = Field(20, ge=1)
    local_epochs: int = Field(2, ge=1)
    proximal_mu: float = Field(0.01, ge=0, description="FedProx μ (strategy fedprox)")
    server_lr: float = Field(0.01, gt=0, description="η of FedAdam/FedYogi")
    tau: float = Field(1e-3, gt=0, description="adaptivity τ of FedAdam/FedYogi")
    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.99, ge=0, lt=1)
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(1.0, gt=0, le=1)
    min_sites: int = Field(2, ge=1, description="sites needed to train or evaluate a round")
    select: Literal["val_loss", "val_roc_auc", "last"] = Field(
        "val_loss", description="which round's model the run keeps: the best by pooled "
                                "validation loss, the best by pooled validation ROC-AUC, or "
                                "the last round; the pooled and local-only comparators of "
                                "safn-sim select by the same rule")
    patience: int | None = Field(
        5, ge=1, description="stop after this many rounds without improvement of the selection "
                             "metric (null: train every round; ignored with select: last)")
    split_seed: int = Field(0, description="seed of every site's train/val/test split")
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    histogram_bins: int = Field(1000, ge=10, description="score histogram bins for pooled AUC")
    round_timeout: float = Field(600, gt=0, description="seconds to wait for a round's replies")
    wait_for_sites: float = Field(
        300, gt=0, description="seconds a run waits for min_sites connected sites, at the start "
                               "and whenever fewer remain; then it stops with its checkpoint")
    rejoin_wait: float = Field(
        60, ge=0, description="seconds a training round waits, at its start, for sites of the "
                              "run that are not connected (e.g. restarting after a crash); a "
                              "site still away after a whole wait is not waited for again "
                              "until it is back; 0: never wait")
    central_dp: CentralDPConfig = Field(
        default_factory=CentralDPConfig,
        description="central DP: server-side clipping + noise (strategies fedavg / fedprox)")
    secure_aggregation: bool = Field(
        True, description="the coordinator sees only federation-wide sums of statistics, "
                          "updates and histograms (pairwise masking); needs 3 or more sites")
    secagg: SecAggConfig = Field(default_factory=SecAggConfig,
                                 description="bounds of secure aggregation's encoding")

    @model_validator(mode="after")
    def _central_dp_strategy(self) -> "FederationConfig":
        if self.central_dp.enabled and self.strategy not in ("fedavg", "fedprox"):
            raise ValueError(
                f"federation.central_dp needs strategy fedavg or fedprox, not "
                f"'{self.strategy}': its noise is calibrated to the average of clipped updates, "
                f"which FedAdam/FedYogi transform afterwards")
        return self


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


class SimulationConfig(Section):
    """Virtual sites on one machine (`safn-sim`): partitioning and the Ray backend."""

    partition: Literal["natural", "iid", "dirichlet", "size_skew"] = "natural"
    n_sites: int = Field(5, ge=1, description="virtual sites (ignored by 'natural')")
    dirichlet_alpha: float = Field(0.5, gt=0, description="label skew; smaller = more skewed")
    size_skew: float = Field(1.0, gt=0, description="Dirichlet α of site sizes; smaller = more skewed")
    seed: int = 0
    compare: bool = Field(True, description="also train pooled and local-only models")
    loso: bool = Field(False, description="leave-one-site-out: one federation per held-out site")
    num_cpus_per_site: float = Field(1.0, gt=0, description="Ray CPUs per ClientApp")
    ray_num_cpus: int | None = Field(
        None, ge=1, description="CPUs Ray may use in all (None = every core); with "
                                "num_cpus_per_site it bounds the concurrent ClientApp actors")
    ray_object_store_mb: int = Field(256, ge=80, description="Ray object store size (MiB)")
    ray_address: str | None = Field(
        None, description="an existing Ray cluster: 'auto' (the one this machine is a node "
                          "of) or the head's host:port (docs/ray-cluster.md)")
    fast_polling: bool = Field(True, description="the ServerApp polls Flower's in-memory Grid "
                                                 "every 10 ms instead of 100 ms (idle time per "
                                                 "round)")
    many_sites_dispatcher: bool = Field(
        False, description="patch Flower's simulation dispatcher to hand out messages every "
                           "10 ms, looking only at nodes that have one: pays off from a few "
                           "hundred virtual sites (docs/flower-patches.md)")
    site_state_dir: Path | None = Field(
        None, description="virtual sites' own state (privacy ledgers), one subfolder per site; "
                          "outside any run folder so later runs find the spent budget (default "
                          "<parent of the run folder>/sim-site-state)")

    @model_validator(mode="after")
    def _cluster_owns_its_resources(self) -> "SimulationConfig":
        if self.ray_address and self.ray_num_cpus:
            raise ValueError(
                f"simulation.ray_num_cpus = {self.ray_num_cpus} with ray_address "
                f"'{self.ray_address}': a Ray cluster's nodes declare their own CPUs (ray start "
                "--num-cpus); set ray_num_cpus to null, or drop ray_address for a local Ray")
        return self


class SiteConfig(Section):
    """One hospital's side of a deployment (`safn-client --site site.yaml`).

    TLS and SuperNode authentication are always on; only ``safn-client --insecure`` (a flag,
    never a config key) turns them off, for local experiments without real data.
    """

    name: str = Field(..., min_length=1, description="the site's name, as the coordinator knows it")
    superlink: str = Field("127.0.0.1:9092", description="the coordinator's SuperLink (host:port)")
    split_seed: int = Field(0, description="seed of this site's train/validation/test split")
    root_certificates: Path | None = Field(None, description="the federation CA (ca.pem)")
    private_key: Path | None = Field(None, description="this site's key (SuperNode authentication)")
    approved_apps: list[str] = Field(
        default_factory=list,
        description="sha256 hashes of the app bundles (FABs) this site agrees to run")
    trusted_entities: Path | None = Field(
        None, description="Flower trusted-entities YAML: run FABs signed by these keys")
    state_dir: Path = Field(Path("safn-site-state"),
                            description="site-local state: privacy ledger, logs")
    local_port: int = Field(9094, ge=1, le=65535,
                            description="the SuperNode's local Runtime API port (127.0.0.1 "
                                        "only; distinct per site on one host)")
    poll_interval: float = Field(
        0.2, ge=0.05, le=3, description="seconds an idle SuperNode waits between two pulls from "
                                        "the SuperLink (Flower's own: 3)")
    connect_wait: float = Field(
        60, ge=0, description="seconds to wait for the coordinator to answer at site.superlink "
                              "(it may be starting); the cause is printed at once")
    activation_wait: float = Field(
        90, ge=0, description="seconds to keep retrying when the SuperLink refuses to activate "
                              "this site (its key unknown, or its last connection not yet "
                              "timed out after a crash)")

    @field_validator("approved_apps")
    @classmethod
    def _hashes(cls, value: list[str]) -> list[str]:
        out = []
        for h in value:
            h = str(h).strip().lower().removeprefix("sha256:")
            if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                raise ValueError(f"site.approved_apps: {h!r} is not a sha256 hash (64 hex "
                                 "digits); copy the hash that safn-server prints for its app")
            out.append(h)
        return out


class ServerConfig(Section):
    """The coordinator (`safn-server --config server.yaml`)."""

    host: str = Field("127.0.0.1", description="interface the SuperLink listens on")
    port: int = Field(9092, ge=1, le=65535,
                      description="the SuperLink's one HTTPS port (Fleet, Control, Runtime APIs)")
    certificates: Path | None = Field(
        None, description="folder with ca.pem, superlink.pem and superlink.key (deploy/make_certs.py)")
    sites: dict[str, Path] = Field(default_factory=dict,
                                   description="the sites allowed to join: name -> public key "
                                               "file (SuperNode authentication)")
    held_out_sites: list[str] = Field(
        default_factory=list, description="sites that only evaluate (external validation): "
                                          "they neither train nor shape the preprocessing")
    run_dir: Path = Field(Path("runs/federation"), description="the run folder on the coordinator")
    poll_interval: float = Field(
        0.2, ge=0.05, le=3, description="seconds between the ServerApp's polls for replies "
                                        "(Flower's own: 3)")
    database: Path | None = Field(None, description="SuperLink state database (default in run_dir)")


class PrivacyConfig(Section):
    """A site's differential privacy (docs/privacy.md): DP-SGD through Opacus, its own budget.

    The site decides: the coordinator may ask for DP for a run but can never weaken these
    settings (`safn_core.privacy.resolve_privacy`). ``epsilon`` is the site's TOTAL budget over
    every run ever trained on its data, kept in a persistent ledger; the noise multiplier is
    calibrated once per run so that the run's planned rounds fit what is left of it.
    In simulation, ``privacy.sites.<site name>`` gives one virtual site its own settings (the
    top level applies to every virtual site not listed).
    """

    mode: Literal["off", "dp-sgd"] = "off"
    epsilon: float | None = Field(
        None, gt=0, description="total ε budget of the site's ledger; required for dp-sgd")
    delta: float | None = Field(
        None, gt=0, lt=1,
        description="δ of the guarantee; default 1/(10·n_train), must be < 1/n_train")
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample gradient clipping norm C")
    max_noise_multiplier: float = Field(
        10.0, gt=0, description="refuse a run whose calibrated σ would exceed this: what is "
                                "left of the budget would buy updates that are mostly noise")
    accountant: Literal["rdp", "prv"] = Field(
        "rdp", description="Opacus accountant: rdp (Rényi DP) or prv (numerical, tighter)")
    ledger: Path | None = Field(
        None, description="privacy ledger file; default <site state folder>/privacy_ledger.json "
                          "(a relative path is taken from the site state folder)")
    accept_ledger_change: bool = Field(
        False, description="continue a ledger written for other training data, another "
                           "accountant or another δ (its recorded spend still counts)")
    statistics: Literal["exact", "gaussian"] = Field(
        "exact", description="statistics round: exact (outside the DP guarantee) or gaussian "
                             "(noised, spends statistics_epsilon from the same ledger)")
    statistics_epsilon: float | None = Field(
        None, gt=0, description="share of epsilon spent on the statistics round (gaussian)")
    secure_rng: bool = Field(
        False, description="Opacus' secure mode (a CSPRNG for noise and sampling; needs "
                           "torchcsprng, refused where it cannot be imported)")
    sites: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="simulation only: per-virtual-site overrides of the keys above")

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false: `mode: off` must still mean "off"
        return "off" if value is False else value

    @model_validator(mode="after")
    def _consistent(self) -> "PrivacyConfig":
        if self.mode == "dp-sgd" and self.epsilon is None:
            raise ValueError("privacy.epsilon is required when privacy.mode is 'dp-sgd' "
                             "(the site's total budget, e.g. epsilon: 3.0)")
        if self.statistics == "gaussian":
            if self.mode != "dp-sgd":
                raise ValueError("privacy.statistics 'gaussian' needs privacy.mode 'dp-sgd' "
                                 "(its spend is kept in the DP ledger)")
            if self.statistics_epsilon is None:
                raise ValueError("privacy.statistics_epsilon is required when "
                                 "privacy.statistics is 'gaussian' (e.g. 0.1 · epsilon)")
            if self.epsilon is not None and self.statistics_epsilon >= self.epsilon:
                raise ValueError(f"privacy.statistics_epsilon ({self.statistics_epsilon}) must "
                                 f"be below privacy.epsilon ({self.epsilon}): the rest of the "
                                 f"budget trains the model")
        if self.secure_rng:
            from safn_core.privacy.randomness import secure_rng_unavailable

            why = secure_rng_unavailable()
            if why:
                raise ValueError(f"privacy.secure_rng: true cannot be turned on here: {why}; "
                                 f"set privacy.secure_rng: false (docs/privacy.md, Randomness)")
        for name in self.sites:
            self.for_site(name)  # every override must give a valid configuration
        return self

    def for_site(self, name: str | None) -> "PrivacyConfig":
        """The settings of site ``name``: the top level updated by its ``sites`` entry."""
        base = self.model_dump(exclude={"sites"})
        override = self.sites.get(name) if name is not None else None
        if not override:
            return PrivacyConfig.model_validate(base)
        if not isinstance(override, dict):
            raise ValueError(f"privacy.sites.{name} must be a mapping of privacy keys")
        if "sites" in override:
            raise ValueError(f"privacy.sites.{name}.sites: per-site settings cannot nest")
        try:
            return PrivacyConfig.model_validate({**base, **override})
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                key = ".".join(str(p) for p in err["loc"])
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] == "extra_forbidden":
                    msg = "unknown key; check its spelling"
                problems.append(f"privacy.sites.{name}.{key}: {msg}" if key else
                                f"privacy.sites.{name}: {msg}")
            raise ValueError("; ".join(problems)) from None


class SafnConfig(Section):
    """The whole configuration; each command uses the sections it needs."""

    data: DataConfig = DataConfig()
    synth: SynthConfig = SynthConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    federation: FederationConfig = FederationConfig()
    simulation: SimulationConfig = SimulationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    personalisation: PersonalisationConfig = PersonalisationConfig()
    harmonisation: HarmonisationConfig = HarmonisationConfig()
    site: SiteConfig | None = None
    server: ServerConfig = ServerConfig()

    @model_validator(mode="after")
    def _secure_aggregation_sites(self) -> "SafnConfig":
        training = set(self.server.sites) - set(self.server.held_out_sites)
        if self.federation.secure_aggregation and self.server.sites and len(training) < 3:
            raise ValueError(
                f"federation.secure_aggregation needs at least 3 training sites, server.sites "
                f"lists {len(training)} (held-out sites do not count): with 2, a sum reveals "
                "each site's values to the other. Add sites, or set "
                "federation.secure_aggregation: false explicitly if you accept that exposure")
        return self


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; save the config as UTF-8") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections "
                          f"(e.g. 'data:'), not a {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``dotted.key=value``; the value is read as YAML (``3``, ``true``, ``[a, b]``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value, e.g. data.min_cell=10")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key is empty; write e.g. data.min_cell=10")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(tree: dict[str, Any], parts: list[str], value: Any, origin: str) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'; check its spelling against configs/ or docs")
        elif err["type"] == "missing":
            lines.append(f"missing required key '{key}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
            lines.append(f"'{key}': {msg}{shown}" if key != "(top level)" else msg)
    return f"{origin}: " + "; ".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                model: type[Section] = SafnConfig) -> SafnConfig:
    """Read ``path`` (or the defaults), apply ``--set`` overrides, validate, return the schema."""
    tree: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    origin = str(path) if path is not None else "configuration"
    for text in overrides or []:
        parts, value = parse_override(text)
        apply_override(tree, parts, value, f"--set {text}")
    if overrides:
        origin += " (with --set overrides)"
    try:
        cfg = model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin)) from None
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    return _resolve_paths(cfg, base)


def _resolve_paths(cfg: SafnConfig, base: Path) -> SafnConfig:
    """Relative paths written in a config file are relative to that file's folder.

    A relative path that exists from the current folder (e.g. given with ``--set``) is kept.
    """
    def fix(value):
        if isinstance(value, Path) and not value.is_absolute() and not value.exists():
            return base / value
        return value

    for section in (cfg.data, cfg.site, cfg.server, cfg.simulation):
        if section is None:
            continue
        for name in type(section).model_fields:
            value = getattr(section, name)
            if isinstance(value, Path):
                setattr(section, name, fix(value))
            elif isinstance(value, dict) and any(isinstance(v, Path) for v in value.values()):
                setattr(section, name, {k: fix(v) for k, v in value.items()})
    return cfg


def dump_config(cfg: Section) -> str:
    """The configuration as YAML, for the run folder (paths as strings)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
