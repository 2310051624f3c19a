"""The two ways a secure sum can end without a result.

`SecureAggregationRefused` is a configuration problem (too few parties for masking to hide
anything) and is a `ConfigError`, so the command-line entry points print it as one line; it is
also a `ValueError` for library callers. `SecureSumFailed` is a run-time outcome (sites dropped
out until too few were left) that the caller may catch and handle, e.g. by skipping the round.
"""

from __future__ import annotations

from safn_core.errors import ConfigError


class SecureAggregationRefused(ConfigError, ValueError):
    """Fewer than 3 parties would contribute: the sum would reveal a site's values to another."""


class SecureSumFailed(RuntimeError):
    """Too few participants remained, or every attempt lost a participant."""
