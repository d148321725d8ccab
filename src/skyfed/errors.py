"""One error hierarchy. The CLI turns a `SkyfedError` into one line and exit code 2."""


class SkyfedError(Exception):
    """A user-facing error: the message alone says what is wrong and where."""


class ConfigError(SkyfedError):
    """The experiment configuration is invalid."""


class DataError(SkyfedError):
    """A data path or data file is missing or unreadable."""


class WireFormatError(SkyfedError):
    """A serialized model or update is malformed, corrupt or does not match the model."""


class PayloadTooLargeError(WireFormatError):
    """A serialized payload is larger than the configured maximum."""


class AuthError(SkyfedError):
    """A client failed authentication."""


class CheckpointError(SkyfedError):
    """A checkpoint is missing or unreadable."""


class SecAggError(SkyfedError):
    """Secure aggregation cannot go on: too few survivors, a forged share, a protocol
    message out of order, or a request that would break the protocol's safety rule."""
