"""The whole configuration, `SafnConfig`: every section, and the checks that span sections."""

from __future__ import annotations

from pydantic import model_validator

from safn_core.config.base import Section
from safn_core.config.data import DataConfig, SynthConfig
from safn_core.config.deployment import ServerConfig, SimulationConfig, SiteConfig
from safn_core.config.federation import FederationConfig
from safn_core.config.model import ModelConfig, TrainConfig
from safn_core.config.privacy import PrivacyConfig
from safn_core.config.site_differences import HarmonisationConfig, PersonalisationConfig
from safn_core.config.tracking import TrackingConfig


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
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _dp_preset(cls, data):
        """A distributed DP run takes the DP preset's values for the keys it does not set
        (`safn_core.config.dp_preset`)."""
        from safn_core.config.dp_preset import apply_preset

        return apply_preset(data)

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

    @model_validator(mode="after")
    def _distributed_dp(self) -> "SafnConfig":
        from safn_core.privacy.noise_shares import min_sites

        if self.privacy.mode != "distributed" or self.site is not None:
            return self  # a deployed site's own file: the run's settings are the coordinator's
        problems = []
        if not self.federation.secure_aggregation:
            problems.append("federation.secure_aggregation must be true (the noise shares "
                            "protect only inside a secure sum); use privacy.mode: dp-sgd "
                            "without secure aggregation")
        if self.federation.central_dp.enabled:
            problems.append("federation.central_dp must be off (distributed DP already noises "
                            "every round's sum)")
        if self.personalisation.enabled:
            problems.append("personalisation must be off (personal models would need local "
                            "DP-SGD of their own; not supported with distributed DP)")
        need = min_sites(self.privacy.distributed.colluding_sites)
        if self.federation.min_sites < need:
            problems.append(f"federation.min_sites must be at least {need} = max(3, "
                            f"privacy.distributed.colluding_sites + 2)")
        training = set(self.server.sites) - set(self.server.held_out_sites)
        if self.server.sites and len(training) < need:
            problems.append(f"server.sites lists {len(training)} training sites; distributed DP "
                            f"against {self.privacy.distributed.colluding_sites} colluding "
                            f"sites needs at least {need}")
        if problems:
            raise ValueError("privacy.mode 'distributed': " + "; ".join(problems))
        return self
