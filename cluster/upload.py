"""``model.upload``: the user's own code sent to every worker with Dask's ``UploadFile`` plugin.

A worker plugin is kept by the scheduler and set up on every worker that joins later too (a nanny
restarting a worker, ``cluster.scale``, a new batch job), so a regroup finds the code where it
builds a replica. Each path gets its own plugin name: one name for all would keep the last file
only. The name is fixed per file name, so a second run on the same cluster replaces the plugin
rather than adding another.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

from distributed import Client
from distributed.diagnostics.plugin import UploadFile

from dasktrain.errors import ConfigError

log = logging.getLogger(__name__)


def upload_user_code(client: Client, paths: Iterable[str]) -> None:
    """Send each ``.py``/``.zip``/``.egg`` file, or package folder (zipped first), of ``paths``
    (relative to the working directory) to every worker of ``client``'s cluster, now and later,
    and import it there. Raises :class:`ConfigError` naming ``model.upload`` and the path."""
    for path in paths:
        source = Path(path).resolve()
        if not source.exists():
            raise ConfigError(f"model.upload: {path} does not exist (relative to the working directory {Path.cwd()})")
        with tempfile.TemporaryDirectory(prefix="dasktrain-upload-") as tmp:
            # UploadFile reads the file when it is made; the zip may go once it exists.
            plugin = UploadFile(str(_zipped(source, Path(tmp)) if source.is_dir() else source))
        try:
            client.register_plugin(plugin, name=f"dasktrain-upload-{plugin.filename}")
        except Exception as exc:  # the user's module fails to import on a worker: its own words
            raise ConfigError(f"model.upload: {path} cannot be imported on the workers: "
                              f"{type(exc).__name__}: {exc}") from None
        log.info("model.upload: sent %s to the workers", path)


def _zipped(package: Path, tmp: Path) -> Path:
    """``package`` as ``<name>.zip`` holding the folder ``<name>/``: an archive on ``sys.path``
    from which ``import <name>`` works (Dask puts an uploaded .zip there)."""
    archive = tmp / f"{package.name}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for folder, dirs, files in os.walk(package):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                file = Path(folder) / name
                zf.write(file, file.relative_to(package.parent))
    return archive
