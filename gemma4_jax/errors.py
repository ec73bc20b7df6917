"""The one exception type users see: a clear, one-line message about bad input (no traceback by default)."""


class Gemma4Error(Exception):
    """Bad input or a bad file: the message says what is wrong and, where it can, how to fix it."""
