"""Run configuration: YAML validated into frozen, typed objects.

A config travels from the driver to every worker, so it is immutable (``frozen=True``) and
variants are made with ``model_copy(update=...)`` or ``--set key=value`` overrides. Unknown keys
and wrong types are errors that name the key and the file. Relative paths are taken relative to
the current working directory, as the CLI is run from the project root.

A rule within one section sits on that section's model. Every rule that relates keys of two
sections sits in one place, :func:`cross_section_problems`, which :class:`RunConfig` runs when it
is built: a config that validates is one the run can honour, as far as the config alone can say
(``model_copy`` does not validate: a variant made that way can be checked with it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from dasktrain.errors import ConfigError, StorageError
from dasktrain.storage import check_url, is_url


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ValidationSplit(_Frozen):
    """Where validation samples come from: a fraction of the store's chunks, or a second store."""

    fraction: float | None = Field(default=None, gt=0.0, lt=1.0)
    """Share of the training store's chunks held out for validation (chosen once, by seed)."""
    store: str | None = None
    """Path of a separate Zarr store with the same arrays, used whole for validation."""

    @model_validator(mode="after")
    def _one_source(self) -> ValidationSplit:
        if (self.fraction is None) == (self.store is None):
            raise ValueError("give exactly one of 'fraction' or 'store'")
        return self


class DataConfig(_Frozen):
    """The Zarr dataset: a group of sample-major arrays chunked along axis 0."""

    store: str
    """Path of the Zarr v3 group written by ``dasktrain ingest``."""
    inputs: str = "inputs"
    """Name of the input array in the group."""
    targets: str = "targets"
    """Name of the target array in the group."""
    inputs_dtype: Literal["float", "int64"] = "float"
    """What the model takes the inputs as: ``float``, features in torch's default float dtype;
    ``int64``, integer ids such as a language model's tokens (for an ``nn.Embedding``)."""
    fields: dict[str, str] | tuple[str, ...] | None = None
    """Store arrays the model is called with, instead of ``inputs``: a mapping of keyword argument
    to array (``model(**batch)``, e.g. ``{input_ids: tokens, labels: tokens}`` for a Hugging Face
    model) or a list of arrays (``model(*batch)``). Each array reaches the model in its own kind:
    integer arrays as int64, floating ones in the default float dtype, booleans as bool."""
    validation: ValidationSplit | None = None
    """Validation split; none means no validation metrics."""
    shuffle_window: int = Field(default=2, ge=1)
    """Chunks a shard shuffles together (the shuffle buffer, in chunks)."""
    normalize: bool = False
    """Standardise each input feature with the mean and std of the training chunks, computed by the
    flow's prepare stage on the cluster and kept in the store's attributes."""
    test_store: str | None = None
    """Store with the same arrays for the flow's evaluate stage (loss, accuracy, predictions); none:
    the validation split, or the training store when there is none."""
    source: str | None = None
    """Where the flow's prepare stage ingests ``store`` from when it does not exist yet:
    ``example:digits``, ``example:text``, an ``.npz`` file (arrays ``inputs``, ``targets``) or a ``.csv`` file (last column the target)."""
    source_chunk_size: int = Field(default=1024, ge=1)
    """Samples per chunk of a store ingested from ``source``."""
    cache: bool = False
    """Keep each worker's decoded training chunks in its memory after their first read (on its GPU
    when it has one and they fit), so the store is read once per run. The chunks are then dealt to
    shards once per run, not once per epoch; each shard still reshuffles its chunks every epoch."""
    cache_limit_gib: float = Field(default=4.0, gt=0)
    """Most host memory a worker's chunk cache may hold; chunks beyond it are read again each epoch."""

    @model_validator(mode="after")
    def _ids_are_not_standardised(self) -> DataConfig:
        if self.normalize and self.inputs_dtype != "float":
            raise ValueError(f"normalize: true standardises float features; inputs_dtype: {self.inputs_dtype} "
                             "inputs are ids, which it would turn into fractions: set one of them back")
        if self.fields is not None:
            if not self.fields:
                raise ValueError("fields names no array; name at least one, or leave it out to call the model "
                                 "with inputs")
            if self.normalize:
                raise ValueError("normalize: true standardises the inputs array, and fields replaces it; "
                                 "standardise the arrays when you write the store, or drop fields")
            if self.inputs_dtype != "float":
                raise ValueError(f"inputs_dtype: {self.inputs_dtype} casts the inputs array, and fields replaces "
                                 "it (each field keeps its array's own kind: integers reach the model as int64)")
        return self

    @property
    def field_arrays(self) -> tuple[str, ...]:
        """The store arrays the model is called with: the fields' arrays, in order, or the inputs."""
        if self.fields is None:
            return (self.inputs,)
        return tuple(self.fields.values()) if isinstance(self.fields, dict) else self.fields


class ModelConfig(_Frozen):
    """The model, built on every worker from an import path and keyword arguments."""

    factory: str = Field(pattern=r"^[\w.]+:[\w.]+$")
    """``module:callable`` returning an ``nn.Module``; built-ins: ``dasktrain.models:mlp``, ``dasktrain.models:cnn``,
    ``dasktrain.models:transformer_lm``."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the factory."""
    upload: tuple[str, ...] = ()
    """Your own code, sent to every worker (also to workers that join later) before the run: ``.py``
    files or package folders (zipped for the trip), a list or one path, relative to the working
    directory. For workers that cannot see the driver's working directory (``address``, jobqueue)."""

    @field_validator("upload", mode="before")
    @classmethod
    def _one_or_more_paths(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("upload")
    @classmethod
    def _uploadable(cls, paths: tuple[str, ...]) -> tuple[str, ...]:
        for path in paths:
            where = Path(path)
            if not where.exists():
                raise ValueError(f"{path} does not exist (relative to the working directory {Path.cwd()})")
            if not (where.is_dir() or where.suffix in (".py", ".zip", ".egg")):  # what Dask's UploadFile imports
                raise ValueError(f"{path} is neither a package folder nor a .py, .zip or .egg file")
        return paths


class OptimizerConfig(_Frozen):
    """Optimizer and its hyper-parameters (unused ones are ignored by the chosen optimizer)."""

    name: Literal["sgd", "adam", "adamw"] = "adamw"
    """Which torch optimizer."""
    lr: float = Field(default=1e-3, gt=0.0)
    """Peak learning rate."""
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    """SGD momentum."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    weight_decay: float = Field(default=0.0, ge=0.0)
    """L2 (SGD, Adam) or decoupled (AdamW) weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/AdamW moment coefficients."""
    eps: float = Field(default=1e-8, gt=0.0)
    """Adam/AdamW denominator term."""


class ScheduleConfig(_Frozen):
    """Learning-rate schedule over global steps."""

    name: Literal["constant", "warmup_cosine"] = "constant"
    """``constant``, or linear warmup then cosine decay to ``min_lr`` at the last step."""
    warmup_steps: int = Field(default=0, ge=0)
    """Steps of linear warmup (warmup_cosine)."""
    min_lr: float = Field(default=0.0, ge=0.0)
    """Learning rate reached at the last step (warmup_cosine)."""


class TrainConfig(_Frozen):
    """The training loop and the sampling plan."""

    epochs: int = Field(default=1, ge=1)
    """Passes over the training chunks."""
    batch_size: int = Field(default=64, ge=1)
    """Global batch size: samples per optimizer step over all workers."""
    shards: int = Field(default=4, ge=1)
    """Logical shards the chunks are dealt into each epoch; the plan depends on this, not on the worker count."""
    seed: int = 0
    """Seed of the plan (chunk dealing, shuffles), of the model's initial weights and of dropout."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Forward/backward precision: fp32, or bf16 autocast with fp32 weights, gradient sums and optimizer state."""
    deterministic: bool = False
    """Per-shard micro-batches and a reduction tree fixed over shards: bitwise-identical weights for any worker count."""
    fan_in: int | None = Field(default=None, ge=2)
    """Inputs per reduction task; none picks one from the number of leaves."""
    ahead: int = Field(default=2, ge=1)
    """Steps the driver keeps submitted beyond the one it waits on."""
    on_nan: Literal["stop", "skip_step"] = "stop"
    """What a NaN/Inf loss or gradient does: stop the run (naming the step), or skip that update and count it."""
    min_workers: int = Field(default=1, ge=1)
    """If the cluster shrinks below this, checkpoint and stop with an error."""
    worker_grace_s: float = Field(default=30.0, ge=0)
    """Seconds to wait for replacement workers (e.g. restarted by their nanny) before ``min_workers`` stops the run."""
    step_timeout: float | None = Field(default=None, gt=0)
    """Seconds a step may take before the workers that have not answered are treated as lost."""
    ledger: bool = False
    """Record which samples every applied step used (``ledger/`` in the run directory), to audit exactly-once use."""
    reduce: Literal["tree", "collective"] = "tree"
    """How gradients are summed: ``tree``, by Dask tasks (elastic: survives lost and added workers);
    ``collective``, by a torch.distributed all-reduce (gloo on CPU, NCCL on GPU) among the workers,
    inside one Dask task per worker that runs many steps: faster, for a cluster that does not change."""
    accumulate: int = Field(default=1, ge=1)
    """Micro-batches each worker splits its part of a step into, run one after the other before the
    gradients are summed: the same update as one pass, with the activations of 1/K of the samples."""
    bucket_mb: float = Field(default=25.0, gt=0)
    """``reduce: collective``: most MiB of gradients summed by one all-reduce. Buckets are launched
    from backward as each is made, so the sums of the last layers overlap the backward pass of the
    first ones (torch DDP's ``bucket_cap_mb``, whose default this is)."""
    host_reads: Literal["auto", "step", "segment"] = "auto"
    """``reduce: collective``: how often a rank reads the step's numbers (loss, counts, whether
    to update) from its device. ``step``: once per step, after the all-reduce, which on a GPU
    waits for the device to finish the step before the next one is queued. ``segment``: once
    per segment of steps; each update is decided on the device (torch's fused optimizers skip
    an update their ``found_inf`` flag marks), and a failed or non-finite step stops every rank
    at that step, found when the segment ends, the steps after it computed but not applied.
    ``auto``: ``segment`` on a GPU, ``step`` on a CPU, where a read waits for nothing."""
    grad_transfer: Literal["fp32", "bf16"] = "fp32"
    """Dtype gradients travel in between Dask tasks (``reduce: tree``): ``bf16`` halves the bytes
    moved; every sum is still taken in fp32, and the optimizer sees fp32."""
    clip_grad_norm: float | None = Field(default=None, gt=0)
    """Clip the reduced mean gradient to this global L2 norm (over all trainable parameters) before
    each optimizer step, alike on every replica; none: no clipping. Not with ``parallel.pipeline > 1``."""

    @model_validator(mode="after")
    def _reduce_options(self) -> TrainConfig:
        if self.reduce == "collective" and self.deterministic:
            raise ValueError("deterministic: true needs reduce: tree (an all-reduce does not fix the order of its sums)")
        if self.reduce != "collective" and self.host_reads == "segment":
            raise ValueError("host_reads: segment needs reduce: collective (a tree step is read on the host to be sent)")
        if self.reduce == "collective" and self.grad_transfer != "fp32":
            raise ValueError("grad_transfer: bf16 applies to reduce: tree only; the collective all-reduce sums in fp32")
        return self


ClusterKind = Literal["local", "local-cuda", "slurm", "pbs", "sge", "lsf", "address"]
CLUSTER_KINDS: tuple[str, ...] = ("local", "local-cuda", "slurm", "pbs", "sge", "lsf", "address")
JOBQUEUE_KINDS: tuple[str, ...] = ("slurm", "pbs", "sge", "lsf")
"""Kinds whose workers are batch jobs submitted by dask-jobqueue."""


class TLSFiles(_Frozen):
    """PEM files for ``security: tls``. Scheduler, workers and client all use them, so for jobqueue
    kinds they must sit on a filesystem that the compute nodes share."""

    ca_file: str
    """Certificate authority: every peer must present a certificate signed by it."""
    cert: str
    """Certificate presented by the scheduler, the workers and the client."""
    key: str | None = None
    """Private key of ``cert``; none when ``cert`` holds the key too."""


class ClusterConfig(_Frozen):
    """The Dask cluster to train on: a spec given inline, or read from a YAML file (``spec``).

    The YAML files in ``cluster/`` document every kind with its defaults. In a run config,
    ``cluster: {spec: slurm, workers: 8}`` takes the shipped SLURM spec and overrides one key;
    ``--set cluster.workers=8`` does the same from the command line. ``cluster: local-cuda``
    (a kind) or ``cluster: my-spec.yaml`` (a file) are shorthands.
    """

    spec: str | None = None
    """YAML spec file whose keys are the defaults of the keys given beside it (those win; ``jobqueue``
    and ``tls`` are merged key by key). A path relative to the current directory, or a bare name
    (``slurm``) for a spec shipped in ``cluster/``. Errors in its keys name the file."""
    kind: ClusterKind = "local"
    """``local``: LocalCluster of worker processes; ``local-cuda``: dask-cuda's LocalCUDACluster, one
    worker per GPU; ``slurm``, ``pbs``, ``sge``, ``lsf``: dask-jobqueue batch jobs; ``address``: a
    running scheduler (not closed by dasktrain)."""
    workers: int | None = Field(default=None, ge=1)
    """Dask workers, each holding one model replica. None: 2 (``local``), every visible GPU
    (``local-cuda``), 1 (jobqueue kinds); for ``address``, the workers to wait for (None: 1)."""
    threads_per_worker: int = Field(default=1, ge=1)
    """Threads per worker (local kinds; jobqueue workers get ``jobqueue.cores / jobqueue.processes``)."""
    memory_limit: str = "auto"
    """Memory limit per worker, Dask syntax such as ``4GiB`` (local kinds; jobqueue kinds: ``jobqueue.memory``)."""
    devices: tuple[int, ...] | None = None
    """GPU indices to use (``local-cuda``); none: every visible GPU."""
    dashboard: bool = True
    """Serve the Dask dashboard on a free port (needs ``bokeh``): of 127.0.0.1 for local kinds, of
    every interface for jobqueue kinds. False: Dask's HTTP servers (which run anyway) listen on
    127.0.0.1 and answer ``/health`` alone. Not for ``address``."""
    lean: bool = True
    """Turn Dask's housekeeping down in the scheduler and workers dasktrain starts: no statistical
    profiler (it samples every thread every 10 ms), an event-loop tick every 500 ms instead of 20 ms,
    a system monitor every 2 s instead of 0.5 s, and the memory monitors of each worker and its
    nanny every 1 s instead of 0.1 s. Together they cost 5-7% of a core per worker here, taken
    from training on a busy machine. False keeps Dask's defaults (the dashboard's Profile page
    needs them); not for ``address``, whose workers have their own config."""
    wait_timeout: float = Field(default=120.0, gt=0)
    """Seconds to wait for the workers to arrive before failing (jobqueue kinds: for the first
    ``train.min_workers`` of them, queueing time included; the others join the run later)."""
    address: str | None = Field(default=None, validate_default=True)
    """Scheduler address such as ``tcp://10.0.0.5:8786`` or ``tls://...`` (``address`` only)."""
    jobqueue: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the dask-jobqueue class: ``cores``, ``memory``, ``processes``, ``queue``,
    ``account``, ``walltime``, ``interface``, ``job_extra_directives``, ``log_directory``, ...
    (jobqueue kinds; the class rejects unknown ones, with the spec named). They are merged onto the
    site's ``jobqueue.<kind>`` Dask config (``jobqueue.yaml``), as dask-jobqueue does: a key set
    here wins (a list such as ``job_script_prologue`` replaces the site's); a key not set here keeps
    the site's value. ``dasktrain cluster show CONFIG`` prints the merged values and the job script."""
    jobqueue_defaults: dict[str, Any] = Field(default_factory=dict)
    """dask-jobqueue arguments used only where neither ``jobqueue`` nor the site's ``jobqueue.<kind>``
    Dask config sets them: the shipped specs' ``cores``, ``memory``, ``processes`` and ``walltime``,
    so that ``spec: slurm`` never overrides a site's own."""
    gpus_per_worker: int = Field(default=0, ge=0, validate_default=True)
    """GPUs each jobqueue worker needs, with one worker process per job; the job requests them (SLURM
    ``--gres=gpu:N``, PBS ``ngpus=N`` in its ``select``, LSF ``-gpu num=N``) so it lands on a GPU node
    and the replica finds its device. SGE has no standard GPU request: use ``job_extra_directives``."""
    gpus_per_job: int = Field(default=0, ge=0, validate_default=True)
    """Multi-GPU nodes (SLURM, PBS): each job asks for this many GPUs and runs as many worker
    processes (``jobqueue.processes`` is set to it), each pinned to its own GPU of the job. Use it
    with ``cluster.workers`` a multiple of it, for whole nodes; not with ``gpus_per_worker``."""
    security: Literal["none", "tls"] = "none"
    """``tls``: scheduler, workers and client talk over TLS and refuse peers without a certificate
    from the run's authority. Local kinds generate certificates for the run unless ``tls`` names files."""
    tls: TLSFiles | None = Field(default=None, validate_default=True)
    """Certificate files for ``security: tls``; required for jobqueue kinds and ``address``."""

    @model_validator(mode="before")
    @classmethod
    def _read_spec(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = cluster_shorthand(data)
        if not isinstance(data, dict) or data.get("spec") is None:
            return data
        if not isinstance(data["spec"], str):
            raise ConfigError(f"cluster.spec must be a file path or a shipped spec name, got {data['spec']!r}")
        path = _spec_path(data["spec"])
        from_file = _read_spec_file(path)
        inline = {k: v for k, v in data.items() if k != "spec"}
        if "kind" in inline and "kind" in from_file and inline["kind"] != from_file["kind"]:
            raise ValueError(f"cluster.spec={data['spec']} is a spec of kind {from_file['kind']!r} "
                              f"({path}), and cluster.kind is {inline['kind']!r}: they conflict; drop cluster.kind, "
                              "or give a spec of that kind")
        merged: dict[str, Any] = dict(from_file)
        for key, value in inline.items():
            both_maps = isinstance(value, dict) and isinstance(merged.get(key), dict)
            merged[key] = {**merged[key], **value} if both_maps else value
        # Validate once here, to name the spec file in errors about the keys that came from it;
        # errors in the keys given inline are left to the run config's own validation.
        try:
            cls.model_validate(merged)
        except ValidationError as exc:
            problems = [_describe(err) for err in exc.errors()
                        if not err["loc"] or str(err["loc"][0]) not in inline]
            if problems:
                raise ConfigError(f"cluster spec {path}: " + "; ".join(problems)) from None
        return {**merged, "spec": str(path)}

    @field_validator("address")
    @classmethod
    def _address_for_kind(cls, value: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")
        if kind == "address" and not value:
            raise ValueError("kind 'address' needs cluster.address, the scheduler's address (e.g. tcp://host:8786)")
        if value and kind != "address":
            raise ValueError(f"cluster.address is only for kind 'address', not {kind!r}")
        return value

    @field_validator("gpus_per_worker")
    @classmethod
    def _one_process_per_gpu_job(cls, value: int, info: ValidationInfo) -> int:
        # The run config's own processes; the site's are checked when the spec is resolved
        # against its Dask config (dasktrain.cluster.jobqueue).
        processes = (info.data.get("jobqueue") or {}).get("processes", 1)
        if value and info.data.get("kind") in JOBQUEUE_KINDS and processes != 1:
            raise ValueError(f"gpus_per_worker={value} needs jobqueue.processes: 1 (found {processes}): "
                             "each worker trains on its own GPU, and the job's GPUs are not split between "
                             "processes; for one job per multi-GPU node use cluster.gpus_per_job")
        return value

    @field_validator("gpus_per_job")
    @classmethod
    def _a_worker_process_per_gpu(cls, value: int, info: ValidationInfo) -> int:
        if not value:
            return value
        kind = info.data.get("kind")
        if kind not in ("slurm", "pbs"):
            raise ValueError(f"gpus_per_job={value} pins one worker process per GPU on kinds 'slurm' and 'pbs', "
                             f"not {kind!r}")
        if info.data.get("gpus_per_worker"):
            raise ValueError(f"gpus_per_job={value} and gpus_per_worker={info.data['gpus_per_worker']} both ask "
                             "for GPUs; use one (gpus_per_job: a job per node, a worker per GPU)")
        processes = (info.data.get("jobqueue") or {}).get("processes", value)
        if processes != value:
            raise ValueError(f"gpus_per_job={value} runs one worker process per GPU, and jobqueue.processes is "
                             f"{processes}; drop jobqueue.processes (it follows gpus_per_job)")
        return value

    @field_validator("tls")
    @classmethod
    def _tls_files_when_needed(cls, value: TLSFiles | None, info: ValidationInfo) -> TLSFiles | None:
        kind, security = info.data.get("kind"), info.data.get("security")
        if security == "tls" and value is None and kind not in ("local", "local-cuda"):
            raise ValueError(f"security 'tls' with kind {kind!r} needs cluster.tls.ca_file and cluster.tls.cert "
                             "(certificates are generated only for local kinds)")
        if value is not None and security != "tls":
            raise ValueError("cluster.tls names certificate files but cluster.security is not 'tls'")
        return value

    @property
    def source(self) -> str:
        """Where this spec came from, for error messages: its file, or the run config."""
        return f"cluster spec {self.spec}" if self.spec else "the run config's cluster section"

    @property
    def fewest_workers(self) -> int:
        """Workers a run on this spec has at least: ``workers``, else what the kind starts by default
        (2 for ``local``, one per GPU of ``devices`` for ``local-cuda``, else 1)."""
        if self.workers is not None:
            return self.workers
        if self.kind == "local":
            return 2
        if self.kind == "local-cuda" and self.devices:
            return len(self.devices)
        return 1

    @property
    def most_workers(self) -> int | None:
        """Workers a run on this spec has at most, where the config alone says it: the local kinds
        start exactly their workers. None where the count is known only when the run has its
        cluster: ``address`` (a running cluster may have more), jobqueue kinds (dask-jobqueue
        rounds workers up to whole jobs) and ``local-cuda`` on every visible GPU."""
        if self.kind == "local":
            return self.workers or 2
        if self.kind == "local-cuda":
            return self.workers or (len(self.devices) if self.devices else None)
        return None

    @property
    def workers_text(self) -> str:
        """``cluster.workers`` as a message names it: its value, or the default the kind takes."""
        if self.workers is not None:
            return f"cluster.workers={self.workers}"
        if self.kind == "local-cuda" and self.devices:
            return f"cluster.workers (unset, so one per GPU of cluster.devices: {len(self.devices)})"
        return f"cluster.workers (unset, so {self.fewest_workers} for kind {self.kind!r})"


def cluster_shorthand(name: str) -> dict[str, Any]:
    """``cluster: NAME`` as a mapping: a jobqueue kind is its shipped spec (the kind with its
    ``jobqueue_defaults``: cores, memory, walltime), another kind is that kind, anything else a spec file."""
    if name in JOBQUEUE_KINDS:
        return {"spec": name}
    return {"kind": name} if name in CLUSTER_KINDS else {"spec": name}


def _spec_path(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    shipped = _shipped_specs()
    if path.suffix == "" and len(path.parts) == 1 and name in shipped:
        return shipped[name]
    raise ConfigError(f"cluster.spec: {name} is not a file, nor a shipped spec ({', '.join(sorted(shipped))})")


def _shipped_specs() -> dict[str, Path]:
    """The YAML specs in the ``dasktrain.cluster`` package (folder ``cluster/``), found without importing it (it imports us)."""
    found = importlib.util.find_spec("dasktrain.cluster")
    if found is None or not found.submodule_search_locations:
        return {}
    folder = Path(next(iter(found.submodule_search_locations)))
    return {p.stem: p.resolve() for p in folder.glob("*.yaml")}


def _read_spec_file(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cluster spec {path} cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"cluster spec {path}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"cluster spec {path}: the top level must be a mapping of keys, found {type(raw).__name__}")
    if "spec" in raw:
        raise ConfigError(f"cluster spec {path}: 'spec' cannot name another spec file (specs do not nest)")
    return raw


def _describe(err: Any) -> str:
    """One pydantic error of a cluster spec, in the words of :func:`validate_config`."""
    key = ".".join(["cluster", *(str(p) for p in err["loc"])])
    if err["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    if err["type"] == "literal_error" and err["loc"] == ("kind",):
        return f"unknown kind {err.get('input')!r} in '{key}' (kinds: {', '.join(CLUSTER_KINDS)})"
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"'{key}': {message} (got {err.get('input')!r})"


class ParallelConfig(_Frozen):
    """Model (pipeline) parallelism: the model cut into stages, each a Dask actor on its own worker."""

    pipeline: int = Field(default=1, ge=1)
    """Pipeline stages P (1: pure data parallelism)."""
    micro_batches: int = Field(default=1, ge=1)
    """Micro-batches m each global batch is split into for the pipeline schedule."""
    schedule: Literal["gpipe", "1f1b", "interleaved-1f1b", "zb-h1"] = "1f1b"
    """GPipe (all forwards, then all backwards), 1F1B (at most P activations alive per stage),
    interleaved 1F1B (``virtual_stages`` chunks per worker; bubble / v) or ZB-H1 (zero bubble:
    backward split into input- and weight-gradient passes, the latter filling the bubble)."""
    virtual_stages: int = Field(default=1, ge=1)
    """Chunks of layers per pipeline worker (v) for ``schedule: interleaved-1f1b``: the model is
    cut into ``pipeline * virtual_stages`` stages, worker r holding stages r, r + P, ..."""
    data: int = Field(default=1, ge=1)
    """Pipeline replicas R (DP x PP): R x P workers; each stage's gradients are tree-reduced across replicas."""
    balance: Literal["params", "time"] = "params"
    """Cut the model into stages of about equal parameter count, or equal measured forward/backward time."""
    cuts: tuple[int, ...] | None = None
    """Explicit cut points (layer indices where stages 2..P begin); overrides ``balance``."""


class CheckpointConfig(_Frozen):
    """When checkpoints are written, and how many are kept."""

    every_steps: int = Field(default=0, ge=0)
    """Also checkpoint every this many global steps (0: only at epoch ends and at the end)."""
    keep: int = Field(default=3, ge=1)
    """Newest checkpoints kept; older ones are deleted after a newer one is complete."""


class MlflowConfig(_Frozen):
    """Where MLflow records a run: its params, metrics and model."""

    uri: str
    """MLflow tracking URI: a server (``http://host:5000``), a database (``sqlite:///mlflow.db``), or a
    folder (``file:///path/mlruns``, which MLflow 3 accepts only with ``MLFLOW_ALLOW_FILE_STORE=true``)."""
    experiment: str = Field(default="dasktrain", min_length=1)
    """Experiment the run is recorded in; created when it does not exist yet."""
    artifact_location: str | None = None
    """Where a new experiment keeps its artifacts (the model); none: the server's choice, or
    ``./mlruns`` for a database URI. An existing experiment keeps its own."""


class TrackingConfig(_Frozen):
    """Experiment tracking, on the driver, from the records of ``metrics.jsonl``: the resolved config
    as params, step and epoch metrics, and the final model. Needs ``pip install 'dasktrain[tracking]'``."""

    mlflow: MlflowConfig | None = None
    """Record the run in MLflow; none: no MLflow."""
    tensorboard: str | None = None
    """Folder of TensorBoard event files; each run writes to a subfolder named after its run
    directory (``tensorboard --logdir`` this folder compares the runs); none: no TensorBoard."""


DIGEST_WHEN_SET = ("inputs_dtype", "fields")
"""``data`` keys that enter the config digest only away from their defaults: added after runs
existed, whose ``--resume`` must keep finding the digest they were written with."""


class RunConfig(_Frozen):
    """Everything a training run needs; saved as ``config.yaml`` in the run directory."""

    data: DataConfig
    model: ModelConfig
    loss: str = Field(default="cross_entropy", pattern=r"^(cross_entropy|mse|model|[\w.]+:[\w.]+)$")
    """Per-sample loss, averaged over the global batch: ``cross_entropy``, ``mse``, ``model`` (the
    model's output carries the loss of its batch: a ``loss`` attribute, as a Hugging Face
    ``ModelOutput`` has, a ``"loss"`` key, or a scalar tensor; taken as the mean over the batch's
    samples), or ``module:callable``, called ``callable(outputs, batch)`` with the batch as a dict
    of tensors (the fields, or ``inputs``; and ``targets``) and returning one loss per sample."""

    metrics: tuple[str, ...] = ()
    """Metrics of your own on the validation split (and the evaluate stage), each a
    ``module:callable`` called ``callable(outputs, batch)`` (the batch as for a loss callable)
    and returning a ``(sum, count)`` pair, e.g. the number of top-3 hits and the samples: the sums
    and counts are added up over every worker and chunk and the metric is sum / count, reported as
    ``val_<callable name>``."""

    @field_validator("metrics")
    @classmethod
    def _metric_paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        names: dict[str, str] = {}
        for path in value:
            if not re.fullmatch(r"[\w.]+:[\w.]+", path):
                raise ValueError(f"{path!r} is not a module:callable path")
            name = metric_name(path)
            if name in ("loss", "accuracy", "error", "samples", "bits"):
                raise ValueError(f"{path} would be reported as {name}, which dasktrain reports itself; rename it")
            if name in names:
                raise ValueError(f"{names[name]} and {path} would both be reported as val_{name}")
            names[name] = path
        return value

    @property
    def needs_targets(self) -> bool:
        """Whether the loss reads ``data.targets`` (``loss: model`` takes its labels from the fields)."""
        return self.loss != "model"
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    cluster: ClusterConfig = ClusterConfig()
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    output_dir: str = "runs/default"
    """Run directory: model, metrics, checkpoints, resolved config. A local path, or a URL on object
    storage (``s3://bucket/runs/x``, ``gs://...``, ``file://...``), like every store path."""
    storage_options: dict[str, Any] = {}
    """Keyword arguments of the fsspec filesystem of every URL in this config (``data.store``,
    ``output_dir``...), as ``zarr.open_group(url, storage_options=...)`` takes them, e.g.
    ``{client_kwargs: {endpoint_url: http://...}}`` or ``{anon: true}``. A key that is a URL prefix
    (``"s3://public-bucket/": {anon: true}``) holds options for the URLs under it only, merged over
    the others. Saved with the config in the run directory: keep credentials in the environment or a
    profile, not here. Not part of the config digest (where the data is read from, not what)."""

    @model_validator(mode="after")
    def _urls_can_be_opened(self) -> RunConfig:
        validation = self.data.validation
        for key, target in (("data.store", self.data.store), ("data.test_store", self.data.test_store),
                            ("data.validation.store", validation.store if validation else None),
                            ("output_dir", self.output_dir)):
            if target is not None:
                try:
                    check_url(target, key)
                except StorageError as exc:  # reported with the config's other problems, naming the file
                    raise ValueError(str(exc)) from None
        if is_url(self.output_dir) and self.parallel.pipeline > 1:
            raise ValueError(f"output_dir {self.output_dir} is on object storage, where pipeline stages cannot "
                             f"write their checkpoint parts yet (parallel.pipeline={self.parallel.pipeline}); "
                             "use a local or shared-filesystem output_dir")
        return self

    @model_validator(mode="after")
    def _cross_section_rules(self) -> RunConfig:
        problems = cross_section_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def digest(self) -> str:
        """Short hash of the settings that decide the training trajectory (not of where it runs)."""
        data = {"test_store", "source", "source_chunk_size"}
        # Keys added after runs existed enter only when set, so those runs keep their digest.
        data.update(k for k in DIGEST_WHEN_SET if getattr(self.data, k) == DataConfig.model_fields[k].default)
        relevant = self.model_dump(mode="json", exclude={
            "cluster": True, "output_dir": True, "checkpoint": True, "storage_options": True,
            "metrics": True,  # measured, not trained on
            "tracking": True,  # where the records are also sent, not what is trained
            "data": data,
            "train": {"ahead", "step_timeout", "min_workers", "worker_grace_s", "ledger", "bucket_mb", "host_reads"},
            "model": {"upload"},  # how the code reaches the workers, not what it computes
        })
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def metric_name(path: str) -> str:
    """What a metric ``module:callable`` is reported as, after ``val_``: the callable's own name."""
    return path.rpartition(":")[2].rpartition(".")[2]


def cross_section_problems(config: RunConfig) -> list[str]:
    """Every rule relating keys of two sections of ``config``: one message per broken rule, naming
    the keys, their values and what would fix it; an empty list when every rule holds.

    These are the checks that need no store, model or cluster: a config that breaks one fails
    when it is built (:func:`validate_config`, :func:`load_config`), before anything starts. The
    run keeps its own checks of what only the running cluster can tell (its actual workers).
    """
    train, par, cluster = config.train, config.parallel, config.cluster
    problems: list[str] = []
    if train.reduce == "collective" and cluster.security == "tls":
        problems.append(
            "train.reduce: collective sends gradients (gloo/NCCL) and its rendezvous (a torch TCPStore, "
            "which has no authentication) outside TLS, so cluster.security: tls refuses it; use "
            "train.reduce: tree to keep TLS, or cluster.security: none on a trusted network")
    if train.clip_grad_norm is not None and par.pipeline > 1:
        problems.append(
            f"train.clip_grad_norm={train.clip_grad_norm} needs the gradient norm over every stage, which "
            f"parallel.pipeline={par.pipeline} stages do not exchange; unset train.clip_grad_norm or use "
            "parallel.pipeline: 1")
    if par.pipeline > 1 and config.data.fields is not None:
        problems.append(
            f"data.fields calls the model with several arrays, and parallel.pipeline={par.pipeline} stages pass "
            "one tensor from stage to stage; use data.inputs, or parallel.pipeline: 1")
    if par.pipeline > 1 and config.metrics:
        problems.append(
            f"metrics need the whole model's output and batch, which no pipeline stage holds "
            f"(parallel.pipeline={par.pipeline}); drop metrics, or use parallel.pipeline: 1")
    if par.pipeline > 1 and config.loss not in ("cross_entropy", "mse"):
        problems.append(
            f"loss: {config.loss} needs the whole model's output and batch, which no pipeline stage holds "
            f"(parallel.pipeline={par.pipeline}); use loss: cross_entropy or mse, or parallel.pipeline: 1")
    if par.pipeline == 1:
        # Data parallelism: each worker streams a contiguous block of at least one shard.
        if cluster.fewest_workers > train.shards:
            problems.append(
                f"{cluster.workers_text} is more than train.shards={train.shards} (each worker streams at "
                "least one shard); raise train.shards or use fewer workers")
        return problems
    if par.schedule == "interleaved-1f1b" and par.virtual_stages < 2:
        problems.append("parallel.schedule: interleaved-1f1b needs parallel.virtual_stages >= 2 (chunks per worker)")
    if par.schedule != "interleaved-1f1b" and par.virtual_stages > 1:
        problems.append(f"parallel.virtual_stages={par.virtual_stages} needs parallel.schedule: interleaved-1f1b, "
                        f"not {par.schedule}")
    if par.schedule == "interleaved-1f1b" and par.micro_batches % par.pipeline:
        problems.append(f"parallel.schedule: interleaved-1f1b sends micro-batches round the workers in groups of "
                        f"parallel.pipeline={par.pipeline}: parallel.micro_batches={par.micro_batches} must be a "
                        "multiple of it")
    if train.precision != "fp32":
        problems.append(
            f"train.precision={train.precision} is not supported with parallel.pipeline={par.pipeline} yet; "
            "pipeline stages train in fp32 (set train.precision: fp32)")
    per_replica = train.batch_size // par.data
    if per_replica == 0:
        problems.append(
            f"parallel.data={par.data} pipeline replicas need at least one sample each, train.batch_size="
            f"{train.batch_size} gives them none; needs train.batch_size >= {par.data}")
    elif par.micro_batches > per_replica:
        problems.append(
            f"parallel.micro_batches={par.micro_batches} is larger than the batch each pipeline replica gets "
            f"(train.batch_size={train.batch_size} / parallel.data={par.data} = {per_replica} samples); "
            f"needs parallel.micro_batches <= {per_replica}")
    need, most = par.pipeline * par.data, cluster.most_workers
    if most is not None and most < need:
        problems.append(
            f"parallel.pipeline={par.pipeline} stages x parallel.data={par.data} replicas needs {need} workers "
            f"(one per stage), more than {cluster.workers_text}; raise cluster.workers or lower "
            "parallel.pipeline/parallel.data")
    return problems


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config, apply ``key.sub=value`` overrides, and validate it.

    Raises :class:`ConfigError` naming the file and every offending key.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, found {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item, path)
    return validate_config(raw, source=str(path))


def validate_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Validate a plain mapping into a :class:`RunConfig`; errors name ``source`` and the keys."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key '{key}'")
            elif err["type"] == "missing":
                problems.append(f"missing key '{key}'")
            elif not err["loc"]:  # a check across sections: its message names the keys
                problems.append(err["msg"].removeprefix("Value error, "))
            elif err["type"] == "value_error" and isinstance(err.get("input"), dict):
                # a check across keys of one section: its message names them, the section's keys are noise
                problems.append(f"'{key}': {err['msg'].removeprefix('Value error, ')}")
            else:
                problems.append(f"'{key}': {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


FLOW_RUN_OVERRIDE_KEYS: tuple[str, ...] = (
    "train.epochs", "train.batch_size", "train.seed", "optimizer.lr", "optimizer.weight_decay",
    "schedule.warmup_steps", "schedule.min_lr", "data.store", "data.test_store", "output_dir", "cluster.workers",
)
"""The keys a flow run of a deployment may override: numbers and data paths. Nothing here names
code to import or run (``model.*``, ``loss``, ``cluster.spec``, ``cluster.jobqueue``, ...)."""


def check_flow_run_overrides(overrides: list[str] | tuple[str, ...], source: str) -> None:
    """Refuse, naming the key, an override outside :data:`FLOW_RUN_OVERRIDE_KEYS` or one whose value
    is not a plain scalar (a number, a string, a boolean)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or key not in FLOW_RUN_OVERRIDE_KEYS:
            raise ConfigError(f"{source}: override of {key!r} refused: a flow run may override only "
                              f"{', '.join(FLOW_RUN_OVERRIDE_KEYS)}; set other keys in the deployment itself")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = None
        if not isinstance(value, (str, int, float)):  # bool is an int; a null or a mapping is refused
            raise ConfigError(f"{source}: override of {key!r} refused: its value {text!r} is not a number or a path")


def _apply_override(raw: dict[str, Any], item: str, path: Path) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if part == "cluster" and node is raw and isinstance(child, str):  # `cluster: slurm` shorthand
            child = node[part] = cluster_shorthand(child)
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: '{part}' in {path} is not a mapping")
        node = child
    node[parts[-1]] = value
