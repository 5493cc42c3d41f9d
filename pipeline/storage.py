"""Where files live: a local path, or a URL on object storage, through fsspec (Zarr's own layer).

Every path a config or a command names (``data.store``, ``output_dir``, ``predict``'s stores and
weights) goes through :func:`locate`, the one place that turns it into something to read and write:

- a plain path or a ``file://`` URL: a :class:`pathlib.Path`, and the local code paths with their
  guarantees (write a temporary file, fsync, rename; ``flock``);
- a URL of another protocol (``s3://``, ``gs://``, ``az://``, ``memory://``...): an
  :class:`ObjectPath`, an fsspec filesystem and a path on it, with the handful of ``pathlib``
  methods the run directory, checkpoints and stores use.

``storage_options`` are the keyword arguments of the fsspec filesystem (as ``zarr.open_group(url,
storage_options=...)`` and ``fsspec.open`` take them), from the config's top-level
``storage_options`` key: plain keys apply to every URL; a key that is itself a URL prefix
(``"s3://public-bucket/": {anon: true}``) holds options for the URLs under it, merged over the
plain ones (the longest matching prefix wins). :func:`options_for` does the merge.

A URL whose protocol fsspec does not know, or whose filesystem package is not installed (``gs://``
without ``gcsfs``), is a :class:`~dasktrain.errors.StorageError` of one line naming the key and
the package to install: never a local directory called ``gs:``.

Object stores have no rename and no directories: an object appears whole or not at all when its
single PUT ends, which is what :meth:`ObjectPath.write_bytes` does; a *set* of objects (a
checkpoint) is made atomic by a marker object written last (:mod:`dasktrain.checkpoint`).
Listings are read fresh every time (fsspec's listing cache dropped first): another process (a
worker, a killed driver's successor) may have written since.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.registry import known_implementations
from fsspec.spec import AbstractFileSystem

from dasktrain.errors import StorageError

_PROTOCOL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
LOCAL_PROTOCOLS = ("file", "local")


def protocol_of(target: str | Path) -> str | None:
    """The URL protocol of ``target`` (``s3`` for ``s3://b/k``), or None for a plain path."""
    if isinstance(target, Path):
        return None
    found = _PROTOCOL.match(target)
    return found.group(1).lower() if found else None


def is_url(target: str | Path) -> bool:
    """Whether ``target`` names object storage (a URL of a protocol other than ``file://``)."""
    protocol = protocol_of(target)
    return protocol is not None and protocol not in LOCAL_PROTOCOLS


def options_for(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The fsspec keyword arguments for ``url``: the plain keys of ``storage_options``, with the
    options of the longest URL-prefix key that ``url`` starts with merged over them."""
    if not storage_options:
        return {}
    plain = {k: v for k, v in storage_options.items() if protocol_of(k) is None}
    prefixes = sorted((k for k in storage_options if protocol_of(k) is not None and url.startswith(k)), key=len)
    for prefix in prefixes:
        plain.update(storage_options[prefix] or {})
    return plain


def check_url(target: str, key: str) -> None:
    """Raise :class:`StorageError` when ``target`` is a URL no installed filesystem can open:
    an unknown protocol, or a known one whose package is missing (the message names it)."""
    protocol = protocol_of(target)
    if protocol is None or protocol in LOCAL_PROTOCOLS:
        return
    _filesystem_class(protocol, target, key)


def filesystem(target: str, storage_options: Mapping[str, Any] | None = None, key: str = "path") -> AbstractFileSystem:
    """The fsspec filesystem of the URL ``target`` with its options (instances are cached by fsspec)."""
    protocol = protocol_of(target) or "file"
    cls = _filesystem_class(protocol, target, key)
    try:
        return cls(**options_for(target, storage_options))
    except Exception as exc:  # a filesystem refuses bad options with several types
        raise StorageError(f"{key} {target}: cannot open the {protocol} filesystem with storage_options: "
                           f"{type(exc).__name__}: {exc}") from None


def locate(target: str | Path | ObjectPath, storage_options: Mapping[str, Any] | None = None,
           key: str = "path") -> AnyPath:
    """``target`` as a :class:`Path` (plain paths and ``file://`` URLs) or an :class:`ObjectPath`
    (other URLs); ``key`` names the config key or argument in errors."""
    if isinstance(target, (Path, ObjectPath)):
        return target
    protocol = protocol_of(target)
    if protocol is None:
        return Path(target)
    if protocol in LOCAL_PROTOCOLS:
        return Path(target.split("://", 1)[1])
    fs = filesystem(target, storage_options, key)
    return ObjectPath(fs, fs._strip_protocol(target).rstrip("/"))


def _filesystem_class(protocol: str, target: str, key: str) -> type[AbstractFileSystem]:
    if protocol not in fsspec.available_protocols():
        raise StorageError(f"{key} {target}: no filesystem is known for the protocol '{protocol}://' "
                           "(fsspec knows s3, gs, az, memory, file, http and others); check the URL")
    try:
        cls: type[AbstractFileSystem] = fsspec.get_filesystem_class(protocol)
    except ImportError:
        hint = known_implementations.get(protocol, {}).get("err") or f"install the fsspec filesystem for {protocol}"
        package = str(known_implementations.get(protocol, {}).get("class", "")).partition(".")[0]
        install = f" (pip install {package})" if package else ""
        raise StorageError(f"{key} {target}: the filesystem for '{protocol}://' is not installed: "
                           f"{hint.rstrip('.')}{install}") from None
    return cls


@dataclass(frozen=True)
class ObjectPath:
    """A file or "directory" (a key prefix) on an fsspec filesystem, with the ``pathlib`` methods
    dasktrain's run directory, checkpoints and stores use. ``str()`` gives the URL."""

    fs: AbstractFileSystem
    path: str
    """The filesystem's own path: no protocol, no trailing slash (``bucket/runs/x`` on S3)."""

    def __str__(self) -> str:
        return str(self.fs.unstrip_protocol(self.path))

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(self.fs, f"{self.path}/{name}")

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.fs, self.path.rpartition("/")[0] or self.path)

    @property
    def parents(self) -> tuple[ObjectPath, ...]:
        found: list[ObjectPath] = []
        here = self
        while here.parent.path != here.path:
            here = here.parent
            found.append(here)
        return tuple(found)

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    def resolve(self) -> ObjectPath:
        return self

    def _fresh(self) -> None:
        self.fs.invalidate_cache(self.path)

    def exists(self) -> bool:
        self._fresh()
        return bool(self.fs.exists(self.path))

    def is_file(self) -> bool:
        self._fresh()
        return bool(self.fs.isfile(self.path))

    def is_dir(self) -> bool:
        self._fresh()
        return bool(self.fs.isdir(self.path))

    def iterdir(self) -> Iterator[ObjectPath]:
        self._fresh()
        if not self.fs.isdir(self.path):
            return iter(())
        return iter([ObjectPath(self.fs, str(p).rstrip("/")) for p in self.fs.ls(self.path, detail=False)
                     if str(p).rstrip("/") != self.path])

    def glob(self, pattern: str) -> Iterator[ObjectPath]:
        """Direct children whose name matches ``pattern`` (one listing, as ``Path.glob`` of a name)."""
        return iter([p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern)])

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: object stores have no directories, a key prefix exists with its objects."""

    def read_bytes(self) -> bytes:
        try:
            return bytes(self.fs.cat_file(self.path))
        except FileNotFoundError:
            raise FileNotFoundError(f"no object {self}") from None

    def read_text(self, errors: str = "strict") -> str:
        return self.read_bytes().decode(errors=errors)

    def write_bytes(self, data: bytes) -> None:
        """One PUT: the object appears whole, or (a failed or killed write) not at all."""
        self.fs.pipe_file(self.path, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def create_exclusive(self, data: bytes) -> bool:
        """Write the object only if none exists (a conditional PUT where the store has one, e.g.
        S3's ``If-None-Match``; elsewhere a check then a write, with a window between); returns
        whether this call created it."""
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError, ValueError):  # this filesystem has no exclusive mode
            if self.exists():
                return False
            self.write_bytes(data)
        return True

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def remove_tree(self) -> None:
        """Delete every object under this prefix (nothing if there is none)."""
        self._fresh()
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)
        self._fresh()

    def size(self) -> int:
        return int(self.fs.size(self.path))

    def read_range(self, start: int, end: int) -> bytes:
        return bytes(self.fs.cat_file(self.path, start=start, end=end))


AnyPath = Path | ObjectPath
"""Where a file or directory is: on local disk, or on object storage."""


def open_zarr_group(target: str | AnyPath, mode: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """``zarr.open_group`` of a local path or a URL (with its storage options, as an FsspecStore)."""
    import zarr

    if isinstance(target, ObjectPath):
        target = str(target)
    if isinstance(target, str) and is_url(target):
        return zarr.open_group(target, mode=mode, storage_options=options_for(target, storage_options))  # type: ignore[arg-type]
    return zarr.open_group(str(locate(target)), mode=mode)  # type: ignore[arg-type]


def remove_tree(target: AnyPath) -> None:
    """Delete a directory tree (a store, a checkpoint) wherever it is; nothing if it is absent."""
    if isinstance(target, ObjectPath):
        target.remove_tree()
        return
    import shutil

    shutil.rmtree(target, ignore_errors=True)
