"""Where a run's files live: a local (or NFS) folder, or any filesystem pyarrow reaches by URI.

``output_dir`` may be a path or a URI such as ``s3://bucket/runs`` or ``gs://bucket/runs``.
:func:`location` gives a local folder as a :class:`pathlib.Path` and anything else as a
:class:`StorePath`, a small path object over :mod:`pyarrow.fs` with the part of ``Path``'s
interface raydag uses (``/``, ``exists``, ``read_text``, ``write_text``, ``iterdir``...), so
the code that lays out a run folder is the same for both.

Options of the store ride in the URI, as :meth:`pyarrow.fs.FileSystem.from_uri` reads them: for
an S3-compatible server ``s3://bucket/out?endpoint_override=host:9000&scheme=http``; credentials
come from the usual environment (``AWS_ACCESS_KEY_ID``...) or instance roles, or from
``s3://KEY:SECRET@bucket/...`` (hidden in messages by :func:`display`). The full URI travels to
every Ray worker, so each resolves the same store.

Commits are safe on object stores: a file is published by one ``write`` (an object store makes
an object visible only once its upload completes; a local file is written aside and renamed),
and resume trusts only files so published.

Example:
    >>> str(location("s3://bucket/out?scheme=http") / "runs" / "abc")
    's3://bucket/out/runs/abc?scheme=http'
    >>> display("s3://key:secret@bucket/out")
    's3://***@bucket/out'
"""

from __future__ import annotations

import fnmatch
import functools
import io
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(value: str) -> bool:
    """Whether ``value`` names a store by URI (``s3://...``) rather than a local path."""
    return bool(_URI.match(str(value))) and not str(value).startswith("file://")


def location(value: "str | os.PathLike | StorePath") -> "RunPath":
    """A local path as ``Path``, a URI (``s3://``, ``gs://``, ``hdfs://``...) as ``StorePath``;
    either of those as it is."""
    if isinstance(value, (Path, StorePath)):
        return value
    text = str(value)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return StorePath(text) if is_uri(text) else Path(text)


def display(value: str | os.PathLike) -> str:
    """``value`` for messages and reports: credentials in any URI in it are masked."""
    return re.sub(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s\"']*@", r"\1***@", str(value))


@functools.lru_cache(maxsize=16)
def _filesystem(root: str) -> tuple[Any, str]:
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(root)


class StorePath:
    """A file or folder on a pyarrow filesystem, named by its URI (see the module doc).

    ``str()`` is the whole URI (what reaches the store); an f-string or ``format()`` gives it
    for messages, credentials masked and options left out (``s3://***@bucket/train.jsonl:12``),
    so a message that names a file never shows them.
    """

    def __init__(self, uri: str) -> None:
        base, _, query = str(uri).partition("?")
        self._base, self._query = base.rstrip("/") or base, query

    # -- naming
    def __str__(self) -> str:
        return self._base + (f"?{self._query}" if self._query else "")

    def __repr__(self) -> str:
        return f"StorePath({display(self)!r})"

    def __format__(self, spec: str) -> str:
        return format(display(self._base), spec)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StorePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def _with_base(self, base: str) -> "StorePath":
        other = StorePath.__new__(StorePath)
        other._base, other._query = base, self._query
        return other

    def __truediv__(self, part: str | os.PathLike) -> "StorePath":
        return self._with_base(f"{self._base}/{str(part).strip('/')}")

    @property
    def name(self) -> str:
        return self._base.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        name = self.name
        return name[name.rfind("."):] if "." in name.lstrip(".") else ""

    @property
    def parent(self) -> "StorePath":
        return self._with_base(self._base.rsplit("/", 1)[0])

    # -- the filesystem
    @property
    def filesystem(self):
        """The ``pyarrow.fs.FileSystem`` this path lives on."""
        return _filesystem(self._root())[0]

    @property
    def path(self) -> str:
        """The path inside :attr:`filesystem` (what pyarrow and Ray Data take with it)."""
        root_path = _filesystem(self._root())[1]
        rest = self._base[len(self._root().partition("?")[0]):].strip("/")
        return f"{root_path.rstrip('/')}/{rest}" if rest else root_path

    def _root(self) -> str:
        """Scheme, authority and query: one filesystem per store, cached."""
        scheme, _, rest = self._base.partition("://")
        authority = rest.split("/", 1)[0]
        return f"{scheme}://{authority}" + (f"?{self._query}" if self._query else "")

    def _info(self):
        return self.filesystem.get_file_info(self.path)

    def exists(self) -> bool:
        import pyarrow.fs

        return self._info().type != pyarrow.fs.FileType.NotFound

    def is_dir(self) -> bool:
        import pyarrow.fs

        return self._info().type == pyarrow.fs.FileType.Directory

    def is_file(self) -> bool:
        import pyarrow.fs

        return self._info().type == pyarrow.fs.FileType.File

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        if not exist_ok and self.exists():
            raise FileExistsError(str(self))
        self.filesystem.create_dir(self.path, recursive=parents)

    def iterdir(self) -> Iterator["StorePath"]:
        import pyarrow.fs

        if not self.is_dir():
            return iter(())
        infos = self.filesystem.get_file_info(pyarrow.fs.FileSelector(self.path))
        return iter([self / info.base_name for info in infos])

    def glob(self, pattern: str) -> Iterator["StorePath"]:
        """Direct children whose name matches ``pattern`` (no ``**``)."""
        return iter([p for p in self.iterdir() if fnmatch.fnmatch(p.name, pattern)])

    def size(self) -> int:
        return self._info().size

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        """One upload: the object appears whole or not at all."""
        with self.filesystem.open_output_stream(self.path) as stream:
            stream.write(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.exists():
            return
        self.filesystem.delete_file(self.path)


RunPath = Path | StorePath


def arrow(path: RunPath) -> tuple[str, Any]:
    """``(path, filesystem)`` for pyarrow and Ray Data calls (``filesystem`` None: local)."""
    if isinstance(path, StorePath):
        return path.path, path.filesystem
    return str(path), None


def open_input(path: RunPath | str):
    """A file opened for reading bytes: seekable, iterable by line (local: ``open``)."""
    path = location(path)
    if isinstance(path, StorePath):
        return io.BufferedReader(path.filesystem.open_input_file(path.path))
    return open(path, "rb")


def file_size(path: RunPath) -> int:
    return path.size() if isinstance(path, StorePath) else path.stat().st_size


def _publish(path: RunPath, write) -> None:
    """``write(target)`` so that ``path`` appears whole or not at all: on a store one upload
    is already so; on disk the file is written aside, then renamed."""
    if isinstance(path, StorePath):
        write(path)
        return
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_atomically(path: RunPath, text: str) -> None:
    """Publish a small text file in one step."""
    _publish(path, lambda target: target.write_text(text))


def remove_tree(path: RunPath) -> None:
    """Delete a folder and everything under it (nothing when it does not exist)."""
    if isinstance(path, StorePath):
        if path.is_dir():
            path.filesystem.delete_dir(path.path)
    elif path.exists():
        shutil.rmtree(path)


def copy_file(source: RunPath, target: RunPath) -> None:
    if isinstance(source, Path) and isinstance(target, Path):
        shutil.copyfile(source, target)
    else:
        target.write_bytes(source.read_bytes())


def write_table(table, path: RunPath) -> None:
    """Write a pyarrow table as one Parquet file, published atomically."""
    import pyarrow.parquet as pq

    def write(target: RunPath) -> None:
        where, filesystem = arrow(target)
        pq.write_table(table, where, filesystem=filesystem)

    _publish(path, write)


# Parquet bytes per block when a dataset is read: ~50 MB in memory at the shards' ~3x encoding.
BLOCK_FILE_BYTES = 16 << 20


def read_dataset(paths: RunPath | list[RunPath], **options):
    """``ray.data.read_parquet`` of a folder or files on disk or on one store.

    One block per ``BLOCK_FILE_BYTES`` of Parquet, at most one per file, unless
    ``override_num_blocks`` says otherwise. Ray's default cuts the files into about 200 small
    blocks, and every later pass pays their per-task overhead (about 4 s a pass at 1,000,000
    rows on 2 cores in ``bench scale``; a pass over 10,000 rows, ~60 tiny shards, still cost
    ~2 s with one block per file).
    """
    import ray

    paths = paths if isinstance(paths, list) else [paths]
    if paths and "override_num_blocks" not in options:
        options["override_num_blocks"] = _blocks_for(paths)
    return ray.data.read_parquet([arrow(p)[0] for p in paths],
                                 filesystem=arrow(paths[0])[1] if paths else None, **options)


def _blocks_for(paths: list[RunPath]) -> int:
    """Blocks for reading these files or folders: their Parquet bytes over
    ``BLOCK_FILE_BYTES``, at least 1, at most one per file (one listing per folder)."""
    import pyarrow.fs

    filesystem = arrow(paths[0])[1] or pyarrow.fs.LocalFileSystem()
    named = [arrow(p)[0] if isinstance(p, StorePath) else os.path.abspath(p) for p in paths]
    files = []
    for info in filesystem.get_file_info(named):
        if info.type == pyarrow.fs.FileType.Directory:
            files += [f for f in filesystem.get_file_info(pyarrow.fs.FileSelector(info.path))
                      if f.type == pyarrow.fs.FileType.File and f.path.endswith(".parquet")]
        elif info.type == pyarrow.fs.FileType.File:
            files.append(info)
    size = sum(f.size or 0 for f in files)
    return max(1, min(len(files), -(-size // BLOCK_FILE_BYTES)))


def write_dataset(dataset, path: RunPath, **options) -> None:
    """``Dataset.write_parquet`` into a folder on disk or on a store."""
    where, filesystem = arrow(path)
    dataset.write_parquet(where, filesystem=filesystem, **options)


def read_frame(path: RunPath, columns: list[str] | None = None):
    """A Parquet file or folder as a pandas frame."""
    import pyarrow.parquet as pq

    where, filesystem = arrow(path)
    return pq.read_table(where, columns=columns, filesystem=filesystem).to_pandas()


def read_schema(path: RunPath):
    """The Parquet schema of one file (only its footer is read)."""
    import pyarrow.parquet as pq

    where, filesystem = arrow(path)
    return pq.read_schema(where, filesystem=filesystem)
