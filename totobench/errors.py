"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class TotobenchError(Exception):
    """A problem with the user's input: file, field, what was expected. Shown as one line."""


class DataError(TotobenchError):
    """A dataset root, annotation file or media file that is missing or malformed."""


class ConfigError(TotobenchError):
    """A task YAML, --set override, model name or layer spec that is invalid."""


class CheckpointError(TotobenchError):
    """A checkpoint directory with missing, corrupt or mismatched files."""


def shown(text: object) -> str:
    """`text` as it may appear inside a one-line message: as is when it is printable on one line,
    else quoted with its control characters escaped."""
    text = str(text)
    return text if text.isprintable() else repr(text)
