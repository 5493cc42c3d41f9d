"""Evaluation and batch inference on the workers, chunk by chunk, from a saved model.

Both submit one task per chunk of the store: the task reads its chunk on the worker, runs the
model there and returns a few numbers (evaluation) or writes the outputs straight into the
matching chunk of the output store (prediction). No data and no weights pass through the
driver: every worker loads ``model.safetensors`` from the shared filesystem (or the object store
of a URL, with the config's ``storage_options``), once per process.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from distributed import Client, wait
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file
from torch import nn
from zarr.codecs import ZstdCodec

from dasktrain import rows
from dasktrain.checkpoint import CHECKPOINTS, latest_checkpoint
from dasktrain.config import RunConfig, metric_name
from dasktrain.errors import CheckpointError, DataError
from dasktrain.feed import open_reader
from dasktrain.metrics import METRICS_FILE
from dasktrain.models import build_model, resolve_callable
from dasktrain.normalize import read_normalization
from dasktrain.objective import (
    batch_loss,
    batch_view,
    call_model,
    cast_field,
    cast_inputs,
    metric_sums,
    output_logits,
    prepare_batch,
    probe_inputs,
)
from dasktrain.preflight import resolve_splits
from dasktrain.run_lock import locks_run_dir_of
from dasktrain.storage import AnyPath, ObjectPath, is_url, locate, open_zarr_group, options_for, remove_tree
from dasktrain.store import ATTRS_KEY, ArraySpec, Chunk, DatasetInfo, open_dataset, open_group, replace_store

PREDICTIONS = "predictions"
LABELS = "labels"
WRITTEN_BY = "predict"
"""``written_by`` in the ``dasktrain`` attributes of a store that :func:`predict` wrote: the only
kind of existing path it replaces."""
RUN_DIR_FILES = ("config.yaml", CHECKPOINTS, "model.safetensors", METRICS_FILE)
"""Any of these makes a directory a run directory, which :func:`predict` never replaces."""

_MODELS: dict[tuple[str, str, str], nn.Module] = {}
"""Models loaded in this (worker) process, by (model config, weights file, its version: mtime or ETag)."""
_MODELS_LOCK = threading.Lock()


@dataclass(frozen=True)
class EvalSplit:
    """Which samples the evaluate stage scores: a name, the store, and its chunks to use."""

    name: str
    dataset: DatasetInfo
    chunks: tuple[Chunk, ...]


def evaluation_split(config: RunConfig) -> EvalSplit:
    """``data.test_store`` when given, else the validation split, else the training chunks."""
    data = config.data
    if data.test_store:
        test = open_dataset(data.test_store, data.inputs, data.targets if config.needs_targets else None,
                            data.field_arrays if data.fields is not None else (), config.storage_options)
        return EvalSplit("test", test, test.chunks())
    splits = resolve_splits(config)
    if splits.val is not None and splits.val_chunks:
        return EvalSplit("validation", splits.val, splits.val_chunks)
    return EvalSplit("train", splits.train, splits.train_chunks)


def weights_file(path: str | AnyPath, storage_options: dict[str, Any] | None = None) -> AnyPath:
    """The ``model.safetensors`` of a file, a checkpoint directory, or a run directory (its final
    model, else its newest checkpoint's), a local path or a URL; errors name the path."""
    path = locate(path, storage_options, "checkpoint")
    if path.is_file():
        return path
    candidates: list[AnyPath] = [path / "model.safetensors"]
    if (path / CHECKPOINTS).is_dir():
        newest = latest_checkpoint(path)
        if newest is not None:
            candidates.append(newest / "model.safetensors")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{path} holds no model: no model.safetensors, nor a checkpoint with one")


def evaluate(client: Client, config: RunConfig, weights: str | AnyPath, split: EvalSplit) -> dict[str, Any]:
    """Loss (mean over samples) and accuracy (classification) or RMS error (regression) of the
    model in ``weights`` on ``split``, one task per chunk on the workers."""
    path = str(weights_file(weights, config.storage_options))
    token = uuid.uuid4().hex[:8]
    futures = [client.submit(_evaluate_chunk, config, path, split.dataset, c, key=f"evaluate-{token}-{c.index}")
               for c in split.chunks]
    parts = client.gather(futures)
    count = sum(p["count"] for p in parts)
    loss = sum(p["loss_sum"] for p in parts) / count if count else float("nan")
    result: dict[str, Any] = {"split": split.name, "store": split.dataset.path, "samples": count, "loss": loss}
    if config.loss == "cross_entropy":
        result["accuracy"] = sum(p["correct"] for p in parts) / count if count else float("nan")
    elif config.loss == "mse":
        result["error"] = math.sqrt(loss)
    for path in config.metrics:  # the run's own, summed over the chunks
        name = metric_name(path)
        total, seen = (sum(p["metrics"][name][i] for p in parts) for i in (0, 1))
        result[name] = total / seen if seen else float("nan")
    return result


@locks_run_dir_of("output_store", "predict")  # refused inside a run directory being written
def predict(client: Client, config: RunConfig, weights: str | AnyPath, input_store: str | AnyPath,
            output_store: str | AnyPath, overwrite: bool = False) -> dict[str, Any]:
    """Run the model on every sample of ``input_store``'s inputs array and write the outputs to
    ``output_store`` (array ``predictions``, plus ``labels`` for classification; only ``labels``
    for a sequence of class logits per sample, e.g. a language model's), chunk by chunk
    from the workers. The store is written under a temporary name and renamed into place; on
    object storage (a URL) its arrays are written in place and the group's ``zarr.json`` last, so
    the store exists only once whole (``--overwrite`` deletes the old one first there)."""
    path = str(weights_file(weights, config.storage_options))
    input_store = str(input_store)
    output = locate(output_store, config.storage_options, "predict output")
    check_output(config, input_store, output, overwrite)
    if config.data.fields is not None:
        info = open_dataset(input_store, config.data.inputs, None, config.data.field_arrays, config.storage_options)
        samples, chunk_size, fields, sample_shape = info.samples, info.chunk_size, info.fields, info.inputs.sample_shape
    else:
        samples, chunk_size, sample_shape = _inputs_layout(input_store, config.data.inputs, config.storage_options)
        fields = ()
    if config.data.normalize:
        read_normalization(config.data.store, config.data.inputs, config.storage_options)  # fail here, naming the store
    out_shape = _output_shape(config, fields, sample_shape)
    if isinstance(output, ObjectPath):
        output.remove_tree()  # checked above: nothing, or predictions replaced with --overwrite
        tmp: AnyPath = output
    else:
        tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
    target = str(tmp)
    try:
        arrays = {PREDICTIONS: (out_shape, "float32")}
        if config.loss == "cross_entropy" or (config.loss not in ("mse",) and len(out_shape) > 1):
            arrays[LABELS] = (out_shape[:-1], "int64")  # one per sample, or per position of a sequence
            if len(out_shape) > 1:
                # A sequence's logits hold a row of classes per position: for a byte-level language
                # model 256 floats per input token, which would dwarf the data. Its labels stay.
                # (With loss: model or a loss of the user's, scores per position are taken as such.)
                del arrays[PREDICTIONS]
        for name, (shape, dtype) in arrays.items():
            # Chunked like the input along axis 0: each task writes whole chunks, never shared ones.
            # Arrays first, the group's zarr.json last (on object storage it marks the store whole).
            zarr.create_array(f"{target}/{name}", shape=(samples, *shape), dtype=dtype, chunks=(chunk_size, *shape),
                              compressors=ZstdCodec(level=3, checksum=True), config={"write_empty_chunks": True},
                              **_remote(target, config))
        chunks = [Chunk(i, s, min(s + chunk_size, samples)) for i, s in enumerate(range(0, samples, chunk_size))]
        token = uuid.uuid4().hex[:8]
        futures = [client.submit(_predict_chunk, config, path, input_store, target, tuple(arrays), c,
                                 key=f"predict-{token}-{c.index}")
                   for c in chunks]
        wait(futures)  # every task has ended, failed or not, before the temporary store may be removed
        written = sum(client.gather(futures))
        group = open_zarr_group(target, "a", config.storage_options)
        group.attrs[ATTRS_KEY] = {"written_by": WRITTEN_BY, "samples": samples, "chunk_size": chunk_size,
                                  "source": input_store, "model": path,
                                  "arrays": {n: {"dtype": d, "sample_shape": list(s)} for n, (s, d) in arrays.items()}}
        if isinstance(output, Path):
            assert isinstance(tmp, Path)
            replace_store(tmp, output)
    except BaseException:
        remove_tree(tmp)  # a failed predict leaves no partial store (on disk: and the old output as it was)
        raise
    return {"store": str(output), "samples": written, "chunks": len(chunks), "arrays": sorted(arrays)}


def _remote(store: str, config: RunConfig) -> dict[str, Any]:
    """``storage_options=`` for zarr when ``store`` is a URL, nothing for a local path."""
    return {"storage_options": options_for(store, config.storage_options)} if is_url(store) else {}


def check_output(config: RunConfig, input_store: str | AnyPath, output_store: str | AnyPath, overwrite: bool) -> None:
    """Refuse an output path that ``predict`` must not write: one that is, lies inside or contains
    the input store or a store of the config, one inside another Zarr store, and an existing path
    other than a store that ``predict`` wrote (only that one is replaced, and only with
    ``overwrite``). Errors name the path and the reason."""
    output = locate(output_store, config.storage_options, "predict output")
    target = _canonical(output)
    validation = config.data.validation
    stores = {"input store": str(input_store), "training store": config.data.store,
              "test store": config.data.test_store, "validation store": validation.store if validation else None}
    for what, store in stores.items():
        if store is None:
            continue
        source = _canonical(locate(store, config.storage_options, what))
        if target == source or target.startswith(source + "/") or source.startswith(target + "/"):
            relation = "is" if target == source else "lies inside" if target.startswith(source + "/") else "contains"
            raise DataError(f"predict output {output} {relation} the {what} {store}; write the predictions elsewhere")
    parents: tuple[AnyPath, ...] = tuple(output.resolve().parents)
    for parent in parents:
        if (parent / "zarr.json").is_file():
            raise DataError(f"predict output {output} lies inside the Zarr store {parent}; write the predictions elsewhere")
    if not (output.exists() if isinstance(output, ObjectPath) else os.path.lexists(output)):
        return
    reason = _not_predictions(output, config.storage_options)
    if reason is not None:
        raise DataError(f"predict output {output} {reason}; predict replaces (with --overwrite) only a store that "
                        "predict wrote: choose another path")
    if not overwrite:
        raise DataError(f"{output} already exists; pass --overwrite to replace it")


def _canonical(where: AnyPath) -> str:
    """A location as one string to compare by prefix: a URL, or an absolute resolved path."""
    return str(where) if isinstance(where, ObjectPath) else str(where.resolve())


def _not_predictions(path: AnyPath, storage_options: dict[str, Any] | None = None) -> str | None:
    """Why the existing ``path`` is not a store that ``predict`` wrote; None when it is one."""
    if isinstance(path, Path) and path.is_symlink():
        return "is a symbolic link"
    if not path.is_dir():
        return "is a file, not a Zarr store"
    marks = [name for name in RUN_DIR_FILES if (path / name).exists()]
    if marks:
        return f"is a run directory (holds {', '.join(marks)})"
    if not (path / "zarr.json").is_file():
        return "is a directory, not a Zarr store"
    try:
        attrs = open_zarr_group(path, "r", storage_options).attrs.get(ATTRS_KEY)
    except Exception:  # zarr raises several types for a damaged group
        return "is not a readable Zarr group"
    if not isinstance(attrs, dict) or attrs.get("written_by") != WRITTEN_BY:
        return f"is a Zarr store that predict did not write (its attributes lack {ATTRS_KEY}.written_by: {WRITTEN_BY})"
    extra = sorted({p.name for p in path.iterdir()} - {"zarr.json", PREDICTIONS, LABELS})
    if extra:
        return f"holds {', '.join(extra)} besides the predictions"
    return None


# -- on the workers --------------------------------------------------------------------------


def _model(config: RunConfig, weights: str) -> nn.Module:
    where = locate(weights, config.storage_options, "checkpoint")
    # The weights' version: a file's mtime, an object's ETag (or modification time).
    version = (str(where.fs.info(where.path).get("ETag") or where.fs.modified(where.path))
               if isinstance(where, ObjectPath) else str(os.stat(where).st_mtime_ns))
    key = (config.model.model_dump_json(), weights, version)
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            model = build_model(config.model, config.train.seed)
            model.load_state_dict(load_tensors(where.read_bytes()) if isinstance(where, ObjectPath)
                                  else load_file(str(where)))
            model.eval()
            _MODELS.clear()  # one model at a time per process: a new run's replaces the last
            _MODELS[key] = model
    return model


def _evaluate_chunk(config: RunConfig, weights: str, dataset: DatasetInfo, chunk: Chunk) -> dict[str, Any]:
    x_np, y_np = open_reader(dataset, config.data).read(chunk)
    x, y = prepare_batch(config.loss, rows.apply(_tensor, x_np, ""), rows.apply(_tensor, y_np, ""),
                         config.data.inputs_dtype)
    samples = rows.count(x)
    loss_fn = resolve_callable(config.loss, "loss") if ":" in config.loss else None
    with torch.no_grad():
        out = call_model(_model(config, weights), config.data.fields, x)
        loss, correct = batch_loss(config.loss, loss_fn, config.data.fields, out, x, y, samples)
        batch = batch_view(config.data.fields, x, y)
        metrics = {metric_name(path): metric_sums(path, resolve_callable(path, "metrics"), out, batch)
                   for path in config.metrics}
        return {"loss_sum": float(loss), "correct": float(correct), "count": samples, "metrics": metrics}


def _tensor(array: Any, _: str) -> torch.Tensor:
    return torch.from_numpy(array) if isinstance(array, np.ndarray) else array


def _predict_chunk(config: RunConfig, weights: str, input_store: str, output_store: str, names: tuple[str, ...],
                   chunk: Chunk) -> int:
    group_in = open_zarr_group(input_store, "r", config.storage_options)
    x: Any
    if config.data.fields is not None:
        x = {name: cast_field(torch.from_numpy(np.asarray(_array(group_in, name)[chunk.start : chunk.stop])))
             for name in dict.fromkeys(config.data.field_arrays)}
    else:
        x_np = np.asarray(_array(group_in, config.data.inputs)[chunk.start : chunk.stop])
        if config.data.normalize:
            x_np = read_normalization(config.data.store, config.data.inputs, config.storage_options).apply(x_np)
        x = cast_inputs(config.data.inputs_dtype, torch.from_numpy(x_np))
    with torch.no_grad():
        out = output_logits("predictions", call_model(_model(config, weights), config.data.fields, x))
    # The arrays, not the group: on object storage the group's zarr.json is written after every chunk.
    opened = {name: zarr.open_array(f"{output_store}/{name}", mode="r+", **_remote(output_store, config))
              for name in names}
    if PREDICTIONS in opened:
        opened[PREDICTIONS][chunk.start : chunk.stop] = out.numpy().astype(np.float32)
    if LABELS in opened:
        opened[LABELS][chunk.start : chunk.stop] = out.argmax(dim=-1).numpy().astype(np.int64)
    return chunk.size


def _array(group: zarr.Group, name: str) -> zarr.Array:
    arr = group[name]
    if not isinstance(arr, zarr.Array):
        raise DataError(f"'{name}' in store {group.store_path} is a group, not an array")
    return arr


# -- on the driver ---------------------------------------------------------------------------


def _inputs_layout(store: str, name: str, storage_options: dict[str, Any] | None = None) -> tuple[int, int, tuple[int, ...]]:
    """Samples, chunk size along axis 0 and sample shape of one array; errors name the store."""
    group = open_group(store, what="input store", storage_options=storage_options)
    if name not in group:
        raise DataError(f"store {store} has no array '{name}' (arrays present: {sorted(group.array_keys())})")
    arr = _array(group, name)
    if arr.ndim < 1 or arr.shape[0] == 0:
        raise DataError(f"array '{name}' in store {store} holds no samples along axis 0")
    return int(arr.shape[0]), int(arr.chunks[0]), tuple(arr.shape[1:])


def _output_shape(config: RunConfig, fields: Sequence[ArraySpec], inputs_shape: Sequence[int]) -> tuple[int, ...]:
    """Per-sample output shape (of the output's logits, for an output that is not a tensor), found
    on the ``meta`` device (no memory, no compute), for ``data.fields``' arrays or the inputs."""
    what = (", ".join(f"'{spec.name}' {spec.sample_shape}" for spec in fields) if config.data.fields is not None
            else f"inputs of shape {tuple(inputs_shape)}")
    with torch.device("meta"):
        model = build_model(config.model, config.train.seed)
        try:
            x = probe_inputs(config.data, fields, inputs_shape)
            out = output_logits("predictions", call_model(model, config.data.fields, x))
        except Exception as exc:
            raise DataError(f"model {config.model.factory} cannot take {what}: {exc}") from None
    return tuple(out.shape[1:])
