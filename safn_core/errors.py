"""User-facing errors: raised for a user's mistake, printed as one line by every command.

A `SafnError` is never shown as a traceback: the command-line entry points catch it, print its
message (which names the file, key, column or rows and says what to do) and exit with status 2.
Anything else is a bug in safn and keeps its traceback.
"""

from __future__ import annotations


class SafnError(Exception):
    """A problem the user can fix: bad configuration, unreadable or unfit data."""

    exit_code = 2


class ConfigError(SafnError):
    """The configuration file or a ``--set`` override is invalid."""


class DataError(SafnError):
    """A data file is missing, unreadable, or fails the site data contract."""
