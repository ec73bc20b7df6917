"""The one exception type users see: a clear, one-line message about bad input (no traceback by default)."""

from __future__ import annotations

import importlib.util


class Gemma4Error(Exception):
    """Bad input or a bad file: the message says what is wrong and, where it can, how to fix it."""


def require_packages(*modules: str, extra: str, what: str) -> None:
    """A missing optional dependency is one line naming it and the extra that installs it."""
    missing = [m for m in modules if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        raise Gemma4Error(f"{what} needs {', '.join(missing)}: pip install 'gemma4-jax[{extra}]'")
