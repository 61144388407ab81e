"""Errors caused by the user's input (config, files, data): the CLI prints them as one line.

Anything else is a bug and keeps its traceback.
"""


class QScopeError(Exception):
    """Base of every error that names a problem in the user's input."""


class ConfigError(QScopeError, ValueError):
    """A config value that is out of range or inconsistent."""


class InputError(QScopeError, ValueError):
    """Input data, files or settings that cannot be used as given."""


class MissingInputError(QScopeError, FileNotFoundError):
    """Something a stage needs is not there (a model directory, a cache, an earlier stage's output)."""
