"""Errors that raydag reports to users as one clear line, without a traceback."""


class RaydagError(Exception):
    """Base class: the CLI prints the message and exits non-zero."""


class ConfigError(RaydagError):
    """A job file or override is invalid (unknown key, wrong type, bad value)."""


class DataError(RaydagError):
    """Input data is unusable (malformed line, missing column, unknown label, empty file)."""


class ColumnContractError(RaydagError):
    """A stage needs a column that its input rows do not have."""
