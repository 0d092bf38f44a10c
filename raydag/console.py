"""What ``raydag`` shows on the terminal, and where everything else goes.

The terminal gets raydag's own lines: a progress line per stage, warnings that matter, the
results and the report path. Everything the libraries print (Ray, Ray Data, Ray Train, vLLM,
DeepSpeed, transformers, C-level output included) goes to a log file: :func:`capture` points
the process's stdout and stderr (file descriptors 1 and 2, which child processes inherit) at the
log, and keeps a handle on the real terminal for :func:`say`. With ``verbose`` the library
output is also shown live.

Without :func:`capture` (a library caller of :func:`raydag.run_job`), :func:`say` prints to
stdout as usual.

Example:
    >>> from raydag import console
    >>> console.say("[read] done")
    raydag: [read] done
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

_terminal: IO[str] | None = None  # the real terminal (stdout) while output is captured
_terminal_err: IO[str] | None = None  # and its stderr
_log: IO[bytes] | None = None
_lock = threading.Lock()


def _emit(line: str, *, end: str = "\n", log: bool = True, err: bool = False) -> None:
    with _lock:
        if err:
            stream = _terminal_err if _terminal_err is not None else sys.stderr
        else:
            stream = _terminal if _terminal is not None else sys.stdout
        stream.write(line + end)
        stream.flush()
        if log:
            _log_line(line)


def _log_line(line: str) -> None:
    """A line of raydag's own in the log, with the time (callers hold ``_lock``)."""
    if _log is not None:
        _log.write(f"{time.strftime('%H:%M:%S')} {line.strip()}\n".encode("utf-8", "replace"))


def say(message: str) -> None:
    """Show one of raydag's own lines (``raydag: <message>``) on the terminal and in the log."""
    _emit(f"raydag: {message}")


def warn(message: str) -> None:
    """Show a warning that matters to the user (on stderr)."""
    _emit(f"raydag: warning: {message}", err=True)


def error(text: str) -> None:
    """Show an error (on stderr), line by line as it is."""
    for line in text.splitlines():
        _emit(line, err=True)


def show(text: str) -> None:
    """Show text as it is (a results table)."""
    for line in text.splitlines():
        _emit(line)


def is_tty() -> bool:
    """Whether raydag's lines go to an interactive terminal."""
    stream = _terminal if _terminal is not None else sys.stdout
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def new_log_file(folder, command: str) -> Path:
    """``<folder>/logs/<command>-<UTC time>.log``: where a command's library output goes. A
    folder on an object store (``s3://``...) cannot be appended to: its logs go to
    ``$RAYDAG_CACHE/logs/`` on this host instead."""
    from raydag.storage import is_uri

    if is_uri(str(folder)):
        folder = Path(os.environ.get("RAYDAG_CACHE", "~/.cache/raydag")).expanduser()
    return Path(folder) / "logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.log"


def log_path() -> str | None:
    """The log file of the current capture, if any."""
    return getattr(_log, "name", None) if _log is not None else None


def _terminal_stream(stream, fd: int) -> tuple[IO[str], bool]:
    """A stream to the terminal that stays one when fd ``fd`` is pointed at the log: a copy of
    the file descriptor when ``stream`` writes to it, else ``stream`` itself (a caller's own
    capture, as pytest's). The flag says whether the stream is ours to close."""
    try:
        if stream.fileno() == fd:
            return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace"), True
    except (AttributeError, ValueError, OSError):
        pass
    return stream, False


@contextmanager
def capture(log_file: str | os.PathLike, verbose: bool = False) -> Iterator[Path]:
    """Send everything written to stdout and stderr to ``log_file`` (appended) while inside.

    Both levels are redirected: the file descriptors 1 and 2 (C libraries, child processes)
    and Python's ``sys.stdout`` / ``sys.stderr``. raydag's own lines (:func:`say`,
    :func:`warn`, :func:`error`, :class:`Progress`) still reach the terminal.

    Args:
        log_file: The log file; its folder is created.
        verbose: Also show the captured output live on the terminal.

    Yields:
        The log file's path.
    """
    global _terminal, _terminal_err, _log
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    old_stdout, old_stderr = sys.stdout, sys.stderr
    terminal, own_out = _terminal_stream(sys.stdout, 1)
    terminal_err, own_err = _terminal_stream(sys.stderr, 2)
    saved_out, saved_err = os.dup(1), os.dup(2)
    log = open(path, "ab", buffering=0)
    pump = None
    if verbose:  # a pipe whose reader writes to the log and the terminal
        read_end, write_end = os.pipe()
        target = write_end

        def copy() -> None:
            while True:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    return
                log.write(chunk)
                terminal.write(chunk.decode("utf-8", "replace"))
                terminal.flush()

        pump = threading.Thread(target=copy, name="raydag-log-pump", daemon=True)
        pump.start()
    else:
        target = log.fileno()
    os.dup2(target, 1)
    os.dup2(target, 2)
    library_out = os.fdopen(os.dup(target), "w", buffering=1, encoding="utf-8", errors="replace")
    sys.stdout = sys.stderr = library_out
    _terminal, _terminal_err, _log = terminal, terminal_err, log
    try:
        yield path
    finally:
        library_out.flush()
        sys.stdout, sys.stderr = old_stdout, old_stderr
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        library_out.close()
        if pump is not None:
            os.close(write_end)
            pump.join(timeout=2)  # child processes may still hold the pipe open
        with _lock:
            _terminal, _terminal_err, _log = None, None, None
        for stream, own in ((terminal, own_out), (terminal_err, own_err)):
            if own:
                stream.close()
            else:
                stream.flush()
        log.close()
        os.close(saved_out)
        os.close(saved_err)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """One progress line for a stage: done / total, rate and ETA.

    On a terminal the line is redrawn in place; otherwise a line is written at most every
    ``every_s`` seconds, and once at the end.

    Args:
        name: The stage, e.g. ``teacher``.
        total: Units to do.
        unit: What a unit is (``rows``).
        done: Units already done (resumed work); they do not count towards the rate.
        every_s: Seconds between lines when not on a terminal.
    """

    def __init__(self, name: str, total: int, unit: str = "rows", done: int = 0,
                 every_s: float = 15.0) -> None:
        self.name, self.total, self.unit = name, max(int(total), 0), unit
        self.done = self._start_done = int(done)
        self.every_s = every_s
        self._started = time.monotonic()
        self._last_line = self._started
        self._tty = is_tty()
        self._closed = False
        self._first: tuple[float, int] | None = None  # when the first units were done

    def _line(self) -> str:
        now = time.monotonic()
        elapsed = max(now - self._started, 1e-9)
        if self._first is not None and self.done > self._first[1]:
            # From the first unit done on: start-up (loading a model) is not the rate.
            rate = (self.done - self._first[1]) / max(now - self._first[0], 1e-9)
        else:
            rate = (self.done - self._start_done) / elapsed
        left = self.total - self.done
        eta = _duration(left / rate) if rate > 0 and left > 0 else ("-" if left > 0 else "0s")
        share = self.done / self.total if self.total else 1.0
        bar = ""
        if self._tty:
            filled = int(share * 20)
            bar = "[" + "#" * filled + "." * (20 - filled) + "] "
        return (f"raydag: [{self.name}] {bar}{self.done}/{self.total} {self.unit} "
                f"({share:.0%}), {rate:.1f} {self.unit}/s, ETA {eta}, elapsed {_duration(elapsed)}")

    def update(self, done: int) -> None:
        """Set the units done so far and show the line if it is time to."""
        self.done = min(int(done), self.total) if self.total else int(done)
        now = time.monotonic()
        if self._first is None and self.done > self._start_done:
            self._first = (now, self.done)
        if self._tty:
            _emit("\r" + self._line() + "\x1b[K", end="", log=False)
        elif now - self._last_line >= self.every_s:
            self._last_line = now
            _emit(self._line())

    def close(self) -> None:
        """Show the final line."""
        if self._closed:
            return
        self._closed = True
        if self._tty:  # the redrawn line goes to the log once, as it ends
            line = self._line()
            _emit("\r" + line + "\x1b[K", end="\n", log=False)
            with _lock:
                _log_line(line)
        else:
            _emit(self._line())
