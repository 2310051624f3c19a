"""Model constants drawn once from a fixed stream that does not depend on the seed.

The four draws share one stream, in this order (changing the order changes every cohort):
regional thinning rates and left-right homologue shares of cortical thickness (MRI), STAI item
weights and Benton item weights (clinical scales).
"""

from __future__ import annotations

import numpy as np

from safn_core.data import ppmi_catalog as cat

CONSTANTS_SEED = 20240531
THICKNESS_HOMOLOGUE = (0.40, 0.52)  # share on the left-right homologue factor (per region, uniform)

_CONST = np.random.default_rng(CONSTANTS_SEED)
THICKNESS_AGEING = dict(zip(cat.DK_REGIONS, _CONST.uniform(0.002, 0.0035, len(cat.DK_REGIONS))))
"""Thinning per year of age, as a fraction of the regional mean (0.2-0.35 %/yr)."""
THICKNESS_LR_SHARE = dict(zip(cat.DK_REGIONS, _CONST.uniform(*THICKNESS_HOMOLOGUE,
                                                             len(cat.DK_REGIONS))))
"""Share of a region's residual variance on its left-right homologue factor."""
STAI_WEIGHTS = _CONST.uniform(0.5, 1.5, 40)
"""How readily each of the 40 STAI items takes anxiety units."""
BENTON_WEIGHTS = _CONST.lognormal(0.0, 0.8, 30)
"""Ease of each of the 30 Benton line-orientation items."""
del _CONST
