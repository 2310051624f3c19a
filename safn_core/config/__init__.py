"""The one configuration schema of safn: typed, validated at load, defaults in one place.

Every command reads a YAML file into `SafnConfig` (sections it does not use keep their defaults),
applies ``--set dotted.key=value`` overrides and validates the result. An unknown key, a wrong type
or a missing required field is a `ConfigError` that names the file and the dotted key.

- base.py: `Section`, the base of every section (unknown keys are errors).
- data.py: `DataConfig` (where a cohort comes from), `SynthConfig` (the synthetic cohort).
- model.py: `ModelConfig` (SAFN and its loss, every ablation), `TrainConfig` (local training).
- federation.py: `FederationConfig` with `SecAggConfig` and `CentralDPConfig`.
- privacy.py: `PrivacyConfig`, a site's DP-SGD and its budget.
- site_differences.py: `HarmonisationConfig` (ComBat), `PersonalisationConfig`.
- deployment.py: `SimulationConfig`, `SiteConfig`, `ServerConfig`.
- schema.py: `SafnConfig`, every section together.
- loading.py: `load_config` (YAML, ``--set`` overrides, errors, relative paths), `dump_config`.
"""

from safn_core.config.data import DataConfig, SynthConfig
from safn_core.config.deployment import ServerConfig
from safn_core.config.federation import CentralDPConfig, FederationConfig
from safn_core.config.loading import dump_config, load_config
from safn_core.config.model import ModelConfig, TrainConfig
from safn_core.config.privacy import PrivacyConfig
from safn_core.config.schema import SafnConfig
from safn_core.config.site_differences import HarmonisationConfig

__all__ = ["CentralDPConfig", "DataConfig", "FederationConfig", "HarmonisationConfig",
           "ModelConfig", "PrivacyConfig", "SafnConfig", "ServerConfig", "SynthConfig",
           "TrainConfig", "dump_config", "load_config"]
