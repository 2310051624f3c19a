"""Which target the sites predict, and whether they and the coordinator agree.

Each site's statistics-round reply names its cohort's target (``Describe.TARGET``: JSON
`Target.to_dict`: name, classes, order, defining features). A run federates one target: the
coordinator stops it at once (`TargetMismatch`, one line) when

- its sites' targets differ from each other (e.g. one site's ``data.target: hc_prodromal_pd``,
  another's ``pd_vs_hc``), or
- they differ from the coordinator's own ``data.target`` (when its ``data.source`` is not a
  table, whose mapping declares the target at each site). A binary coordinator configuration and
  binary sites always agree, as before targets existed (a deployed table federation's
  coordinator keeps the default ``pd_vs_hc``).

A reply without the key (a site from before targets) is the binary ``pd_vs_hc``.
"""

from __future__ import annotations

import json

from safn_core.config import SafnConfig
from safn_core.federation.protocol import Describe
from safn_core.targets import BUILT_IN, PD_VS_HC, TARGETS, Target, target_for
from safn.server.site_waits import SitesMissing


class TargetMismatch(SitesMissing):
    """The sites predict different targets, or not the coordinator's: the run stops at once."""


def reply_target(site_record) -> Target:
    """The target a site's ``SITE`` record names (``pd_vs_hc`` when it names none; a built-in
    target as `safn_core.targets` defines it, with its description)."""
    text = site_record.get(Describe.TARGET)
    if text is None:
        return PD_VS_HC
    found = Target.from_dict(json.loads(str(text)))
    known = TARGETS.get(found.name)
    return known if known is not None and _same(known, found) else found


def configured_target(cfg: SafnConfig) -> Target | None:
    """The coordinator's own ``data.target`` (None for a table: each site's mapping says)."""
    return None if cfg.data.source == "table" else target_for(cfg.data.target)


def describe(t: Target) -> str:
    return f"{t.name} ({' / '.join(t.classes)}{', ordered' if t.ordered else ''})"


def _same(a: Target, b: Target) -> bool:
    return a.to_dict() == b.to_dict()


def run_target(targets: dict[str, Target], configured: Target | None) -> Target:
    """The one target of the run's sites (``targets``: site name → its target), checked
    against each other and against ``configured``; `TargetMismatch` otherwise."""
    groups: list[tuple[Target, list[str]]] = []
    for name, t in sorted(targets.items()):
        for known, names in groups:
            if _same(known, t):
                names.append(name)
                break
        else:
            groups.append((t, [name]))
    if len(groups) > 1:
        said = "; ".join(f"{', '.join(names)}: {describe(t)}" for t, names in groups)
        raise TargetMismatch(f"the sites predict different targets ({said}): every site's "
                             f"data.target (or its table mapping's label) must be the same")
    if not groups:
        return configured or PD_VS_HC
    found, names = groups[0]
    if configured is not None and not _same(found, configured) \
            and not (found.binary and configured.binary):
        fix = (f"set data.target: {found.name} in the coordinator's configuration"
               if found.name in BUILT_IN else
               "give the coordinator the sites' table (data.source: table, its mapping)")
        raise TargetMismatch(
            f"the sites ({', '.join(names)}) predict {describe(found)} but the coordinator's "
            f"configuration has data.target: {configured.name} ({' / '.join(configured.classes)})"
            f": {fix}, or each site's data.target to {configured.name}")
    return found
