"""The loader's one error type: data that cannot be streamed at all (as opposed to a bad sample, which is skipped)."""


class DataError(RuntimeError):
    """A pattern matching nothing, a stream with nothing usable, a state that does not fit: the message says which."""


class SkipSample(ValueError):
    """A decoder's refusal of one sample under a named skip reason (``no_frames``, ``short_clip``, ...): the reader
    and the worker count it as ``reason`` instead of ``corrupt_<kind>``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason  # the skip reason counted (data_pipeline.stats)
        self.detail = detail  # what was wrong, for the warning line
