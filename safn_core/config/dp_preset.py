"""The DP preset: the SAFN recipe distributed DP runs use unless the configuration says otherwise.

Under DP the number of weights multiplies the noise (its norm grows with √d while the clipped
signal's does not), and every round is one noised gradient step, so the recipe that suits
non-private training (wide encoders, an ensemble of 8, a few local epochs per round) is not the
one that suits DP. `DISTRIBUTED_PRESET` was chosen by `benchmarks/dp_recipe_search.py` on the
pooled *validation* splits only (the test splits never steered it; the search's size and cost
are in docs/benchmarks.md). `apply_preset` fills in every preset key the user's configuration
does not set itself, when ``privacy.mode`` is ``distributed``: a key given in the YAML file or
with ``--set`` always wins. The run's ``config.yaml`` records the values used.
"""

from __future__ import annotations

import copy
from typing import Any

DISTRIBUTED_PRESET: dict[str, Any] = {
    "federation": {"rounds": 50},
}
"""Section → key → value (nested sections as nested dicts)."""


def apply_preset(tree: Any) -> Any:
    """``tree`` (a raw configuration mapping) with the preset's keys it lacks, when its
    ``privacy.mode`` is ``distributed``; otherwise unchanged."""
    if not isinstance(tree, dict):
        return tree
    privacy = tree.get("privacy")
    if not isinstance(privacy, dict) or privacy.get("mode") != "distributed":
        return tree
    out = dict(tree)
    _fill(out, DISTRIBUTED_PRESET)
    # a round needs max(3, t + 2) sites: the default minimum follows the run's t
    from safn_core.privacy.noise_shares import min_sites

    distributed = privacy.get("distributed") if isinstance(privacy.get("distributed"), dict) \
        else {}
    try:
        t = int(distributed.get("colluding_sites", 1))
    except (TypeError, ValueError):
        return out  # validation names the bad value
    _fill(out, {"federation": {"min_sites": min_sites(max(t, 0))}})
    return out


def _fill(tree: dict, preset: dict) -> None:
    for key, value in preset.items():
        if isinstance(value, dict):
            below = tree.get(key)
            if below is None:
                below = {}
            elif not isinstance(below, dict):
                continue  # the user's own (invalid) value: validation reports it
            else:
                below = dict(below)
            _fill(below, value)
            tree[key] = below
        elif key not in tree:
            tree[key] = copy.deepcopy(value)
