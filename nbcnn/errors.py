"""What a user's mistake with data raises, and how any exception is said in one line."""


class DataError(ValueError):
    """A data file is missing, unreadable, or not what it should be."""


def describe(exc, limit=200):
    """``Type: message`` of an exception on one line (whatever newlines its message holds), cut to ``limit``."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:limit]}"
