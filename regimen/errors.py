"""The one exception type for mistakes a user can fix.

Everything a user gets wrong (a config key, a value, a path, a checkpoint) raises `UserError`
with one line that says what, where, and what is allowed. The CLI prints that line and exits
with code 2; internal invariants use `assert` instead.

Example:
    >>> raise UserError("optimizer.lr = -1: must be > 0")
    Traceback (most recent call last):
    regimen.errors.UserError: optimizer.lr = -1: must be > 0
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input, reported as one clear line (CLI exit code 2)."""
