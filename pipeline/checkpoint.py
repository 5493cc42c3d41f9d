"""Atomic checkpoints: tensors in safetensors (no pickle), everything else in JSON.

A checkpoint is a directory ``checkpoints/step-NNNNNNNN`` holding ``model.safetensors``,
``optimizer.safetensors`` and ``state.json`` (global step, epoch, config digest, the config, the
layout of the stores it trained on (``data_layout``) and the optimizer's non-tensor state). It is
written under a temporary name, every file is fsynced, then the directory is renamed into place
and its parent fsynced: a process killed at any point leaves either the complete new checkpoint
or none, and the previous one untouched. Only names matching ``step-NNNNNNNN`` with a readable
``state.json`` are ever resumed from.

On object storage (``output_dir`` a URL: :class:`~dasktrain.storage.ObjectPath`) there is no
rename, and no fsync to make: each object appears whole when its PUT ends. A checkpoint is
written straight under its final name, every file, and then the marker object ``COMMITTED`` last
(:data:`MARKER`); readers trust only a checkpoint whose marker exists. Replacing or deleting a
checkpoint removes its marker first. So a driver or worker killed at any moment leaves either a
committed checkpoint or objects without a marker, which resume ignores (and the next writer of
that step clears), and the previous checkpoint untouched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as dump_tensors

from dasktrain.errors import CheckpointError
from dasktrain.storage import AnyPath, ObjectPath, locate

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
DATA_LAYOUT = "data_layout"
"""Key of ``state.json`` holding, per config key (``data.store``, ``data.validation.store``), the
store's :func:`dasktrain.store.store_layout`."""
_NAME = re.compile(r"^step-(\d{8})$")
MARKER = "COMMITTED"
"""On object storage, the object written last into a checkpoint: its presence marks it complete."""


class DataChangedError(CheckpointError):
    """A store the run trained on changed (length, chunking, arrays, metadata) since its checkpoint."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint."""

    path: AnyPath
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        """Updates applied when it was written; training goes on with this global step."""
        return int(self.state["step"])


def write_file_atomic(path: AnyPath, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename (on object storage:
    one PUT, which is atomic by itself)."""
    if isinstance(path, ObjectPath):
        path.write_bytes(data)
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save_model(path: AnyPath, state: dict[str, torch.Tensor]) -> None:
    """Write a model ``state_dict`` as safetensors, atomically."""
    write_file_atomic(path, dump_tensors({k: v.detach().cpu().contiguous() for k, v in state.items()}))


def save_checkpoint(
    run_dir: AnyPath,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int,
) -> AnyPath:
    """Write the checkpoint of global ``step`` atomically and prune to the newest ``keep``."""
    tmp = begin_checkpoint(run_dir, step)
    opt_tensors, opt_rest = split_optimizer_state(optimizer_state)
    files = {
        "model.safetensors": dump_tensors({k: v.detach().cpu().contiguous() for k, v in model_state.items()}),
        "optimizer.safetensors": dump_tensors(opt_tensors),
        # state.json last: its presence in a renamed directory marks a complete checkpoint.
        "state.json": json.dumps({**state, "step": step, "optimizer": opt_rest}, indent=1).encode(),
    }
    for name, data in files.items():
        if isinstance(tmp, ObjectPath):
            (tmp / name).write_bytes(data)
            continue
        with open(tmp / name, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return commit_checkpoint(run_dir, tmp, step, keep)


def begin_checkpoint(run_dir: AnyPath, step: int) -> AnyPath:
    """A fresh temporary directory for the checkpoint of global ``step``, beside where it goes
    (on object storage: its final prefix, emptied, uncommitted until :func:`commit_checkpoint`).

    Whoever fills it (one writer here, or every pipeline stage for its own part) writes
    ``state.json`` last and hands it to :func:`commit_checkpoint`."""
    if isinstance(run_dir, ObjectPath):
        final = run_dir / CHECKPOINTS / f"step-{step:08d}"
        _remove(final)  # a re-run of the same step (after a resume): the old one is uncommitted first
        return final
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_checkpoint(run_dir: AnyPath, tmp: AnyPath, step: int, keep: int) -> AnyPath:
    """Rename a filled temporary directory into place as the checkpoint of ``step`` (on object
    storage: write its marker) and prune to the newest ``keep``: the one way a checkpoint appears
    or goes, so a crash at any moment leaves only whole checkpoints under the names resume reads."""
    if not (tmp / "state.json").is_file():
        raise CheckpointError(f"checkpoint {tmp} has no state.json: it is not complete")
    if isinstance(tmp, ObjectPath):
        files = {p.name: p.size() for p in tmp.iterdir()}
        (tmp / MARKER).write_bytes(json.dumps({"step": step, "files": files}).encode())
        for old in list_checkpoints(run_dir)[:-keep]:
            _remove(old)
        return tmp
    assert isinstance(run_dir, Path)
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    fsync_dir(tmp)
    if final.exists():  # a re-run of the same step (after a resume): replace it whole
        _remove(final)
    os.rename(tmp, final)
    fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        _remove(old)
    return final


def checkpoint_step(checkpoint: str | AnyPath) -> int:
    """The global step a checkpoint was written at, from its ``state.json`` (no tensors read)."""
    try:
        return int(json.loads((locate(checkpoint) / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {checkpoint}: state.json does not say its step: {exc}") from None


def checkpoint_state(checkpoint: str | AnyPath) -> dict[str, Any]:
    """A checkpoint's ``state.json`` (step, config digest, data layout, stage bounds...)."""
    try:
        state: dict[str, Any] = json.loads((locate(checkpoint) / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {checkpoint}: state.json is unreadable: {exc}") from None
    return state


def _remove(checkpoint: AnyPath) -> None:
    """Delete a checkpoint by first renaming it out of the names resume looks at (on object
    storage: by deleting its marker first)."""
    if isinstance(checkpoint, ObjectPath):
        (checkpoint / MARKER).unlink(missing_ok=True)
        checkpoint.remove_tree()
        return
    doomed = checkpoint.with_name(f".{checkpoint.name}.del-{os.getpid()}")
    os.rename(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(run_dir: str | AnyPath) -> list[AnyPath]:
    """Complete checkpoints of a run, oldest first (on object storage: those with their marker)."""
    run_dir = locate(run_dir, key="run directory")
    if isinstance(run_dir, ObjectPath):
        # One listing of the whole checkpoints prefix: the names, and which ones hold a marker.
        prefix = run_dir / CHECKPOINTS
        prefix.fs.invalidate_cache(prefix.path)
        objects = [str(p) for p in prefix.fs.find(prefix.path)]
        committed = {o.rsplit("/", 2)[-2] for o in objects if o.endswith(f"/{MARKER}")}
        with_state = {o.rsplit("/", 2)[-2] for o in objects if o.endswith("/state.json")}
        return [prefix / n for n in sorted(committed & with_state) if _NAME.match(n)]
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found: list[AnyPath] = [p for p in root.iterdir() if _NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | AnyPath) -> AnyPath | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def damage_of(checkpoint: AnyPath) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (None if it reads back whole): ``state.json``
    is not a JSON record with a step, or a ``.safetensors`` file's header or length is wrong (a
    file truncated or overwritten after the atomic rename: a full disk, a bad copy, a user). Only
    headers are read, not the tensors."""
    from safetensors import safe_open

    try:
        state = json.loads((checkpoint / "state.json").read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"state.json: {type(exc).__name__}: {exc}"
    files: list[AnyPath] = sorted(checkpoint.glob("*.safetensors"), key=lambda p: p.name)
    if not files:
        return "no .safetensors file"
    for file in files:
        if isinstance(file, ObjectPath):
            reason = _object_safetensors_damage(file)
            if reason is not None:
                return reason
            continue
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as exc:  # safetensors raises its own SafetensorError for a bad header or length
            return f"{file.name}: {exc}"
    return None


def set_aside_damaged(run_dir: AnyPath) -> list[str]:
    """Rename the newest checkpoints that cannot be read (see :func:`damage_of`) to
    ``.step-NNNNNNNN.damaged`` (kept for a look, out of the names resume considers), newest first,
    until one reads back; returns one line per checkpoint set aside, for the log. On object
    storage the checkpoint keeps its name and loses its marker (its objects stay for a look)."""
    notes = []
    for checkpoint in reversed(list_checkpoints(run_dir)):
        reason = damage_of(checkpoint)
        if reason is None:
            break
        if isinstance(checkpoint, ObjectPath):
            (checkpoint / MARKER).unlink(missing_ok=True)
            notes.append(f"checkpoint {checkpoint} cannot be read ({reason}); its {MARKER} marker is removed, "
                         "going on from the one before it")
            log.warning(notes[-1])
            continue
        aside = checkpoint.with_name(f".{checkpoint.name}.damaged")
        if aside.exists():
            shutil.rmtree(aside)
        os.rename(checkpoint, aside)
        notes.append(f"checkpoint {checkpoint} cannot be read ({reason}); set aside as {aside.name}, "
                     "going on from the one before it")
        log.warning(notes[-1])
    return notes


def load_checkpoint(path: str | AnyPath) -> Checkpoint:
    """Load a checkpoint directory; errors name the file that is missing or unreadable."""
    path = locate(path, key="checkpoint")
    try:
        state = json.loads((path / "state.json").read_text())
        model = load_tensors((path / "model.safetensors").read_bytes())
        opt_tensors = load_tensors((path / "optimizer.safetensors").read_bytes())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from None
    optimizer = join_optimizer_state(opt_tensors, state.pop("optimizer"))
    return Checkpoint(path, model, optimizer, state)


def check_data_layout(checkpoint: AnyPath, recorded: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse to resume from ``checkpoint`` when a store changed since it was written.

    ``recorded`` is the checkpoint's ``data_layout`` (None for checkpoints written before it was
    recorded: allowed, with a warning), ``current`` the stores' layouts now. The sampling plan is a
    function of the store's layout, so a store re-ingested with another length or chunking would
    continue the run on another trajectory (or another dataset) without a word; the error names
    the store, the checkpoint and what changed, e.g. ``inputs shape (1797, 64) -> (1000, 64)``.
    """
    if recorded is None:
        log.warning("checkpoint %s records no data layout (written by an older dasktrain): cannot check "
                    "that %s did not change since; resuming anyway", checkpoint, ", ".join(current))
        return
    for key in sorted(set(recorded) | set(current)):
        was, now = recorded.get(key), current.get(key)
        if was is None or now is None:
            raise DataChangedError(
                f"--resume: checkpoint {checkpoint.name} was written {'without' if was is None else 'with'} "
                f"{key}, this run has {'none' if now is None else now['path']}; the trajectory cannot continue")
        changes = describe_layout_change(was, now)
        if changes:
            raise DataChangedError(
                f"--resume: {key} {now['path']} changed since checkpoint {checkpoint.name}: {'; '.join(changes)}; "
                "the trajectory cannot continue (restore the store as it was, or start a new run in another output_dir)")


def describe_layout_change(was: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two :func:`dasktrain.store.store_layout` records, in words (empty: nothing)."""
    old_arrays, new_arrays = was.get("arrays", {}), now.get("arrays", {})
    changes = []
    if sorted(old_arrays) != sorted(new_arrays):
        changes.append(f"arrays {sorted(old_arrays)} -> {sorted(new_arrays)}")
    for name in sorted(set(old_arrays) & set(new_arrays)):
        a, b = old_arrays[name], new_arrays[name]
        for field in ("shape", "dtype", "chunks"):
            if a.get(field) != b.get(field):
                changes.append(f"{name} {field} {_shown(a.get(field))} -> {_shown(b.get(field))}")
    if not changes and was.get("fingerprint") != now.get("fingerprint"):
        changes.append(f"metadata fingerprint {was.get('fingerprint')} -> {now.get('fingerprint')} "
                       "(attributes or codecs of the group or its arrays)")
    return changes


def _shown(value: Any) -> str:
    return str(tuple(value)) if isinstance(value, list) else str(value)


def split_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for idx, entry in sd["state"].items():
        plain = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain[name] = value
        rest["state"][str(idx)] = plain
    return tensors, rest


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in rest["state"].items()}
    for key, value in tensors.items():
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def _object_safetensors_damage(file: ObjectPath) -> str | None:
    """Why a safetensors object's header or length is wrong (None: it reads back whole), from its
    first bytes and its size: the 8-byte header length, the JSON header, the last tensor's end."""
    try:
        size = file.size()
        head = file.read_range(0, 8)
        length = int.from_bytes(head, "little")
        if len(head) < 8 or length > size - 8:
            return f"{file.name}: header length {length} does not fit the object's {size} bytes"
        header = json.loads(file.read_range(8, 8 + length))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{file.name}: {type(exc).__name__}: {exc}"
    if 8 + length + end != size:
        return f"{file.name}: the object holds {size} bytes, its header describes {8 + length + end}"
    return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
