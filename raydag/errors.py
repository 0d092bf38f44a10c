"""Errors that raydag reports to users as one clear line, without a traceback."""


class RaydagError(Exception):
    """Base class: the CLI prints the message and exits non-zero."""


class ConfigError(RaydagError):
    """A job file or override is invalid (unknown key, wrong type, bad value)."""


class DataError(RaydagError):
    """Input data is unusable (malformed line, missing column, unknown label, empty file)."""


class ColumnContractError(RaydagError):
    """A stage needs a column that its input rows do not have."""


class EngineStartError(RaydagError):
    """An engine actor's engine could not start (raised in the actor, re-raised on the driver
    with the engine's own message by :func:`raise_engine_failure`)."""

    @classmethod
    def failed(cls, spec: dict, cause: str) -> "EngineStartError":
        """The engine of ``spec`` (:func:`raydag.engines.make_engine`'s) failed with ``cause``."""
        return cls(f"{_engine_name(spec)} could not start: {cause}")

    @classmethod
    def timed_out(cls, spec: dict, timeout_s: float) -> "EngineStartError":
        """The engine of ``spec`` had not started after ``timeout_s``."""
        return cls(f"{_engine_name(spec)} did not start within {timeout_s:g}s "
                   "(teacher.start_timeout_s)")


def _engine_name(spec: dict) -> str:
    return f"the teacher engine ({spec.get('engine', 'vllm')}, model {spec.get('model')})"


def last_exception_line(lines) -> str | None:
    """The last of ``lines`` that names an exception (``SomeError: message``), stripped: an
    engine's own error in a traceback or log that ends in a generic one."""
    import re

    found = [line.strip() for line in lines if re.match(r"^\s*(\w+\.)*\w*(Error|Exception): .", line)]
    return found[-1] if found else None


class StageStalled(RaydagError):
    """No row finished a step on an engine actor for ``teacher.stall_timeout_s`` while rows
    were in flight (raised in the actor with a diagnosis)."""


def raise_engine_failure(err: BaseException) -> None:
    """Raise the :class:`EngineStartError` or :class:`StageStalled` an engine actor failed
    with, with its own message, when ``err`` (a Ray Data failure, which carries the actor's
    traceback as text) holds one; return otherwise, so the caller re-raises ``err``."""
    import re

    for kind in (EngineStartError, StageStalled):
        found = re.findall(rf"{kind.__name__}: (.+)", str(err))
        if found:
            raise kind(found[-1].strip()) from err


class JobInterrupted(RaydagError):
    """The job was stopped by a signal (SIGINT or SIGTERM); finished shards are kept.

    Attributes:
        signal_name: ``SIGINT`` or ``SIGTERM``.
        report: The partial report's path, when one was written.
    """

    def __init__(self, signal_name: str, report: object = None) -> None:
        super().__init__(f"stopped by {signal_name}")
        self.signal_name, self.report = signal_name, report

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process a signal ended."""
        return 143 if self.signal_name == "SIGTERM" else 130
