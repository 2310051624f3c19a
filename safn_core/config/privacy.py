"""A site's differential privacy (privacy): DP-SGD settings, its budget, per-site overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from safn_core.config.base import Section


class DistributedDPConfig(Section):
    """Distributed DP-SGD (``privacy.mode: distributed``; docs/privacy.md): every round is one
    DP-SGD step over the union of the sites' Poisson samples, each site adding a share of the
    noise inside the secure sum. Run-level settings: the coordinator's apply to every site."""

    sample_rate: float = Field(
        0.2, gt=0, le=1, description="Poisson sampling rate q of every site's training split")
    colluding_sites: int = Field(
        1, ge=0, description="t: the guarantee holds against the coordinator with up to t "
                             "colluding or dropped-out sites (a round needs max(3, t + 2) sites)")
    optimizer: Literal["adam", "sgd"] = Field(
        "adam", description="the coordinator's step on the noised mean gradient: adam "
                            "(Flower's FedAdam) or sgd with momentum (Flower's FedAvgM)")
    learning_rate: float = Field(0.01, gt=0, description="the coordinator's step size")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd's momentum; adam's β₁")


class PrivacyConfig(Section):
    """A site's differential privacy (docs/privacy.md): DP-SGD through Opacus, its own budget.

    The site decides: the coordinator may ask for DP for a run but can never weaken these
    settings (`safn_core.privacy.resolve_privacy`). ``epsilon`` is the site's TOTAL budget over
    every run ever trained on its data, kept in a persistent ledger; the noise multiplier is
    calibrated once per run so that the run's planned rounds fit what is left of it.
    In simulation, ``privacy.sites.<site name>`` gives one virtual site its own settings (the
    top level applies to every virtual site not listed).
    """

    mode: Literal["off", "dp-sgd", "distributed"] = Field(
        "off", description="off; dp-sgd (each site noises its own updates: holds against "
                           "everyone); distributed (noise shares under secure aggregation: "
                           "holds against the coordinator with up to privacy.distributed."
                           "colluding_sites sites)")
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
    distributed: DistributedDPConfig = Field(default_factory=DistributedDPConfig)
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
        if self.mode != "off" and self.epsilon is None:
            raise ValueError(f"privacy.epsilon is required when privacy.mode is '{self.mode}' "
                             "(the site's total budget, e.g. epsilon: 3.0)")
        if self.statistics == "gaussian":
            if self.mode == "off":
                raise ValueError("privacy.statistics 'gaussian' needs privacy.mode 'dp-sgd' or "
                                 "'distributed' (its spend is kept in the DP ledger)")
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

    @property
    def dp(self) -> bool:
        """Whether the site trains under a DP guarantee (either mode)."""
        return self.mode != "off"

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
