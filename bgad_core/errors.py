"""Exceptions that tell the user which file or key is wrong.

Both derive from ValueError so callers that only know the standard library still catch them.
"""


class DataError(ValueError):
    """An image, mask or dataset layout is missing, unreadable or inconsistent; the message names the file."""


class ConfigError(ValueError):
    """A parameter is outside its valid range or unknown; the message names the key."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the message names the meta-epoch, level and loss terms."""


class ExportError(RuntimeError):
    """The model cannot be exported to ONNX; the message names the layer that stops it."""
