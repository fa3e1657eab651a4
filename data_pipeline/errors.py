"""The loader's one error type: data that cannot be streamed at all (as opposed to a bad sample, which is skipped)."""


class DataError(RuntimeError):
    """A pattern matching nothing, a stream with nothing usable, a state that does not fit: the message says which."""
