"""The DP preset: the SAFN recipe distributed DP runs use unless the configuration says otherwise.

Under DP the number of weights multiplies the noise (its norm grows with √d while the clipped
signal's does not), and every round is one noised gradient step, so the recipe that suits
non-private training (wide encoders, an ensemble of 8, a few local epochs per round) is not the
one that suits DP. `DISTRIBUTED_PRESET` was chosen by `benchmarks/dp_recipe_search.py` on the
pooled *validation* splits only (the test splits never steered it; the search's size and cost
are in docs/benchmarks.md). `apply_preset` fills in every preset key the user's configuration
does not set itself, when ``privacy.mode`` is ``distributed``: a key given in the YAML file or
with ``--set`` always wins. The run's ``config.yaml`` records the values used. A deployed site's
own ``site.yaml`` takes no preset: the recipe reaches it from the coordinator, and what is the
site's own (``privacy.accountant``, ``privacy.max_noise_multiplier``) keeps its own defaults.
"""

from __future__ import annotations

import copy
from typing import Any

DISTRIBUTED_PRESET: dict[str, Any] = {
    "model": {"d_model": 8, "n_heads": 2, "encoder_hidden": 64, "ffn_hidden": 128,
              "head_hidden": 8, "ensemble_size": 7, "wide": "trained"},
    "privacy": {"max_grad_norm": 1.08758, "accountant": "prv", "max_noise_multiplier": 30.0,
                "distributed": {"optimizer": "adam", "learning_rate": 0.0140772,
                                "sample_rate": 0.653287}},
    "federation": {"rounds": 20, "patience": None},
}
"""Section → key → value (nested sections as nested dicts).

The best of 34 optuna trials (TPE, 36.5 min of wall time, 2026-12-07) of
`benchmarks/dp_recipe_search.py`: seed 0, ε = 3, δ = 1e-5, the synthetic cohort without motor
scales, objective the pooled validation ROC-AUC of the selected round (0.900; the untuned
default recipe of 50 rounds, 64-wide model, q 0.2, C 1, adam at 0.01 gave 0.799). A narrow model
(d_model 8, head 8; about 5× fewer weights than the default), 7 ensemble members, the wide path
trained from zero, a large Poisson rate (q ≈ 0.65) and only 20 rounds: few, large, less noisy
steps. With it σ ≈ 4.2 at ε = 3 and δ = 1e-5, 11.2 at ε = 1: above the default noise cap
(``privacy.max_noise_multiplier`` 10), which the preset raises to 30 for a simulation's virtual
sites (the benchmark's value; the cap exists to refuse updates that are mostly noise, and at
ε = 1 the union's expected batch of ≈ 300 still gave 0.95 ROC-AUC on the synthetic cohort). A
deployed site keeps its own cap: at ε = 1 it declines with that reason unless it raises it.
Every round is trained (``patience`` null); the round with the best pooled validation loss is
kept. One seed's validation split (≈ 108 participants) steered the choice: expect its 0.900 to
be optimistic."""


def apply_preset(tree: Any) -> Any:
    """``tree`` (a raw configuration mapping) with the preset's keys it lacks, when its
    ``privacy.mode`` is ``distributed``; otherwise unchanged."""
    if not isinstance(tree, dict):
        return tree
    privacy = tree.get("privacy")
    if not isinstance(privacy, dict) or privacy.get("mode") != "distributed":
        return tree
    if tree.get("site") is not None:
        # a deployed site's own site.yaml: the run's recipe comes from the coordinator, and
        # the site's own keys (its accountant, its noise cap) keep the site's own defaults
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
