"""The run's shared settings, as every message carries them to the sites.

Sites never read the coordinator's run folder for their settings: every message carries the
run's shared settings (`shared_config_text`: model, local training, federation, privacy request,
min_cell) and a site combines them with its own file (`site_run_config`).
"""

from __future__ import annotations

from functools import lru_cache

import yaml

from safn_core.config import SafnConfig

SHARED_SECTIONS = ("model", "train", "federation", "privacy", "personalisation",
                   "harmonisation")
"""What the coordinator decides for everyone; ``data`` and ``site`` stay each site's own."""


def shared_config_text(cfg: SafnConfig) -> str:
    """The run's shared settings as the YAML text every message carries."""
    tree = cfg.model_dump(mode="json", include=set(SHARED_SECTIONS))
    tree["data"] = {"min_cell": cfg.data.min_cell}
    return yaml.safe_dump(tree, sort_keys=True)


@lru_cache(maxsize=16)
def shared_config(text: str) -> SafnConfig:
    """Parse what `shared_config_text` wrote (cached: one parse per run and process)."""
    return SafnConfig.model_validate(yaml.safe_load(text))


def site_run_config(shared: SafnConfig, own: SafnConfig) -> SafnConfig:
    """A deployed site's settings for one run: the coordinator's model, training and federation
    settings; the site's own data, site section, split seed and privacy settings; ``min_cell``
    the larger of the two (a coordinator can tighten a site's small-cell rule, never relax it)."""
    cfg = shared.model_copy(deep=True)
    cfg.data = own.data.model_copy(update={"min_cell": max(own.data.min_cell,
                                                           shared.data.min_cell)})
    cfg.site = own.site
    if own.site is not None:
        cfg.federation = cfg.federation.model_copy(update={"split_seed": own.site.split_seed})
    cfg.privacy = own.privacy
    return cfg
