"""One exception hierarchy. Every message says what, where, what was expected and what to do."""


class ScdinoError(Exception):
    """Base of every error scdino raises on purpose; the command-line tools print it on one line and exit 2."""


class InputError(ScdinoError):
    """A plate, image, label image or crop store is not what scdino expects."""


class CheckpointError(ScdinoError):
    """A model checkpoint cannot be used: unreadable, unsafe, truncated or of another architecture."""


class ConfigError(ScdinoError):
    """Options that contradict each other or the data."""


class OutputError(ScdinoError):
    """An output store exists and cannot be resumed, or cannot be written."""
