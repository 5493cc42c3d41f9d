"""The ``dasktrain`` command line: ``ingest`` a dataset into a Zarr store, ``run`` a training config.

The CLI owns the terminal and nothing else: it parses arguments, calls into ``pipeline``, draws
the progress display from the driver's events and prints summaries. Every
:class:`~dasktrain.errors.DasktrainError` becomes one red ``error: ...`` line on stderr and exit
code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from dasktrain.errors import DasktrainError

if TYPE_CHECKING:
    from dasktrain.config import RunConfig
    from dasktrain.run_loop import Event, RunResult

app = typer.Typer(
    name="dasktrain",
    help="Train PyTorch models data-parallel on a Dask cluster over Zarr datasets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

out = Console()
err = Console(stderr=True)


def _without_traceback(record: logging.LogRecord) -> bool:
    """A library's log record on the terminal as its message alone: Dask logs a lost connection
    with a 50-line traceback before the run ends with its own one-line error (--verbose keeps it)."""
    if record.exc_info and not record.name.startswith("dasktrain"):
        record.msg = f"{record.getMessage()} ({record.exc_info[1]!r})" if record.exc_info[1] else record.getMessage()
        record.args = ()
        record.exc_info = None
        record.exc_text = None
    return True


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log INFO messages (default: warnings only).")] = False,
) -> None:
    """Train PyTorch models data-parallel on a Dask cluster over Zarr datasets."""
    _project_importable()
    # Log records go to stderr, so stdout keeps only the progress display and the summaries.
    # The level sits on the handler too: Dask's loggers set their own (INFO) levels and
    # propagate to the root, so the root logger's level alone would not hold them back.
    level = logging.INFO if verbose else logging.WARNING
    handler = RichHandler(console=err, level=level, show_time=False, show_path=False)
    if not verbose:
        handler.addFilter(_without_traceback)
    # force=True: the last call wins, also when the app is invoked twice in one process (tests).
    logging.basicConfig(level=level, format="%(name)s: %(message)s", handlers=[handler], force=True)
    logging.captureWarnings(True)
    if not verbose:
        # A task that raises is logged by its worker ("Compute Failed", with the traceback) before
        # the driver reports it as one error line. Worker processes set up their logging from the
        # environment when they start, so this is the one place to quiet them from here; memory
        # warnings keep their own level.
        os.environ.setdefault("DASK_LOGGING", repr({"distributed.worker": "critical",
                                                    "distributed.worker.memory": "warning"}))


def _project_importable() -> None:
    """Put the working directory first on the import path, as ``python -m`` would, unless it is
    there already (``PYTHONPATH``, or ``python -m dasktrain.cli``).

    The user's project is where they run ``dasktrain`` from: ``model.factory: mymodels:tiny`` names
    a ``mymodels.py`` there. A console script starts with its own ``bin`` folder on ``sys.path``
    instead. Worker processes of local clusters start with the driver's ``sys.path``, so they see it
    too; workers elsewhere need it on their own path or ``model.upload``."""
    cwd = os.getcwd()
    if cwd not in {os.path.abspath(entry or os.curdir) for entry in sys.path}:
        sys.path.insert(0, cwd)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn a :class:`DasktrainError` into one red line on stderr and exit code 1."""
    try:
        yield
    except DasktrainError as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        # Text, not markup: messages hold brackets ("[0, 1]") that rich would take for tags;
        # soft_wrap: one line however narrow the terminal.
        err.print(Text(f"error: {message}", style="red"), soft_wrap=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        if exc.errno not in _STORAGE_ERRORS:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        err.print(Text(f"error: {exc.strerror or exc}{where}; the last checkpoint written is intact", style="red"),
                  soft_wrap=True)
        raise typer.Exit(1) from None


_STORAGE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
"""Storage errors a user fixes (a full disk or quota, a read-only or forbidden path): one line."""


# -- ingest -----------------------------------------------------------------------------------


@app.command()
def ingest(
    out_path: Annotated[str, typer.Argument(metavar="OUT", help="Path or URL (s3://...) of the Zarr store to write.")],
    example: Annotated[str | None, typer.Option(help="A bundled example dataset: digits, or text (bytes of Python's own documentation).")] = None,
    image: Annotated[bool, typer.Option("--image", help="With --example digits: image-shaped inputs (1, 8, 8) instead of flat (64,).")] = False,
    context: Annotated[int | None, typer.Option(min=1, help="With --example text: bytes per sample (default: 64).")] = None,
    inputs: Annotated[Path | None, typer.Option(help="Inputs as a .npy file (with --targets).")] = None,
    targets: Annotated[Path | None, typer.Option(help="Targets as a .npy file (with --inputs).")] = None,
    npz: Annotated[Path | None, typer.Option(help="Inputs and targets as two arrays of one .npz file.")] = None,
    inputs_key: Annotated[str, typer.Option(help="With --npz: name of the inputs array.")] = "inputs",
    targets_key: Annotated[str, typer.Option(help="With --npz: name of the targets array.")] = "targets",
    csv: Annotated[Path | None, typer.Option(help="A CSV file with a header row; one column is the target.")] = None,
    target_column: Annotated[str | None, typer.Option(help="With --csv: the target column (default: the last).")] = None,
    regression: Annotated[bool, typer.Option("--regression", help="With --csv: real-valued targets instead of class labels.")] = False,
    chunk_size: Annotated[int | None, typer.Option(min=1, help="Samples per chunk along axis 0 (default: 64 for the small examples, else 1024).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing store.")] = False,
) -> None:
    """Write a dataset (bundled example, .npy pair, .npz or CSV) as a Zarr store for training."""
    sources = {
        "--example": example is not None,
        "--inputs/--targets": inputs is not None or targets is not None,
        "--npz": npz is not None,
        "--csv": csv is not None,
    }
    given = [name for name, present in sources.items() if present]
    if len(given) != 1:
        found = f"got {' and '.join(given)}" if given else "got none"
        raise typer.BadParameter(f"give exactly one source of {', '.join(sources)}; {found}")
    if (inputs is None) != (targets is None):
        raise typer.BadParameter("--inputs and --targets go together")
    _only_with("--image", image, "--example digits", example == "digits")
    _only_with("--context", context is not None, "--example text", example == "text")
    _only_with("--inputs-key/--targets-key", (inputs_key, targets_key) != ("inputs", "targets"), "--npz", npz is not None)
    _only_with("--target-column/--regression", target_column is not None or regression, "--csv", csv is not None)

    from dasktrain import ingest as ing

    with _user_errors():
        if example is not None:
            arrays = ing.example_arrays(example, image=image, context=context or ing.TEXT_CONTEXT)
            source = f"example:{example}"
        elif npz is not None:
            arrays, source = ing.read_npz(npz, inputs_key, targets_key), str(npz)
        elif csv is not None:
            arrays, source = ing.read_csv(csv, target_column, classification=not regression), str(csv)
        else:
            assert inputs is not None and targets is not None
            arrays, source = ing.read_npy(inputs, targets), f"{inputs}, {targets}"
        if chunk_size is None:
            chunk_size = 64 if example is not None else 1024
        path = ing.write_store(out_path, arrays, chunk_size=chunk_size, overwrite=overwrite, source=source)
        _print_store(path, ing.store_summary(path))


def _only_with(option: str, used: bool, needs: str, present: bool) -> None:
    if used and not present:
        raise typer.BadParameter(f"{option} only applies with {needs}")


def _print_store(path: object, summary: dict[str, Any]) -> None:
    samples, chunk_size = summary["samples"], summary["chunk_size"]
    chunks = math.ceil(samples / chunk_size)
    # soft_wrap: paths stay whole on one line, to be copied, however narrow the terminal.
    out.print(f"wrote {escape(str(path))}: {samples} samples in {chunks} chunks of {chunk_size}", soft_wrap=True)
    table = Table()
    for name in ("array", "dtype", "sample shape", "chunk shape"):
        table.add_column(name)
    for name, spec in summary["arrays"].items():
        shape = tuple(spec["sample_shape"])
        table.add_row(name, spec["dtype"], str(shape), str((min(chunk_size, samples), *shape)))
    out.print(table)
    out.print(f"source: {escape(summary.get('source') or '-')}", soft_wrap=True)


# -- run --------------------------------------------------------------------------------------


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Run config (YAML), e.g. examples/digits.yaml.")],
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a config key (repeatable), e.g. --set train.epochs=3."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in output_dir from its newest checkpoint.")] = False,
    until_epoch: Annotated[
        int | None, typer.Option(min=1, help="Stop, with a checkpoint, after this many epochs (resume later).")
    ] = None,
) -> None:
    """Train a config as a Prefect flow run (prepare, train, evaluate, publish) on the Dask cluster
    it names; show progress and an epoch summary.

    With PREFECT_API_URL set the run is recorded on that server (checked first); without, on
    Prefect's local temporary server with its database in .prefect/ beside the run directory."""
    from dasktrain.config import load_config
    from dasktrain.preflight import Preflight, preflight
    from dasktrain.prepare import store_pending
    from dasktrain.run_dir import RunResult, run_location

    with _user_errors():
        # The YAML is read and validated here, once; the flow gets the validated config. Bad input
        # fails in seconds, before Prefect and the cluster start, and the flow uses these checks
        # rather than make them again (a store still to be ingested is checked by the flow, after).
        cfg = load_config(config, overrides or [])
        checked = None if store_pending(cfg.data, cfg.storage_options) else preflight(cfg)
        training = _import_flows()
        resume_with = shlex.join(["dasktrain", "run", str(config), *(f"--set={o}" for o in overrides or []), "--resume"])
        # A cross-entropy over sequence targets is in nats per token: the epoch lines add bits.
        per_token = (cfg.loss == "cross_entropy" and isinstance(checked, Preflight)
                     and checked.splits.train.targets is not None and checked.splits.train.targets.sample_shape != ())
        with _interrupts_stop_the_run(cfg, resume_with), _ProgressView(cfg, per_token) as view:
            summary = training.run_training(cfg, resume=resume, until_epoch=until_epoch, on_event=view.on_event,
                                            checked=checked)
    result = RunResult(run_location(cfg), summary["steps"], summary["completed"])
    _print_run(result, cfg, [str(config), *(f"--set={o}" for o in overrides or [])], per_token)
    _print_outputs(summary)


@contextmanager
def _interrupts_stop_the_run(cfg: Any, resume_with: str) -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM stop the run the same way: the exception unwinds the driver,
    which cancels its steps and closes the cluster; Prefect marks the flow run crashed; the
    local Prefect server stops last. Then one line says where to go on from, and exit code 130."""
    from dasktrain.checkpoint import latest_checkpoint
    from dasktrain.run_dir import run_location

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    except KeyboardInterrupt:
        newest = latest_checkpoint(run_location(cfg))
        where = (f"last good checkpoint {newest}; go on with: {resume_with}" if newest
                 else "no checkpoint was written")
        err.print(Text(f"interrupted: the run stopped; {where}", style="red"), soft_wrap=True)
        raise typer.Exit(130) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _import_flows() -> Any:
    """``dasktrain.flows.training``, imported with the terminal kept: Prefect sets up its own logging when
    imported (its handler on the root logger); the CLI's stays, and flow- and task-run logs go to
    the Prefect API only unless --verbose."""
    handlers, level = list(logging.root.handlers), logging.root.level
    import dasktrain.flows
    import dasktrain.flows.training

    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)
    if level > logging.INFO:
        dasktrain.flows.quiet_run_logs()
    return dasktrain.flows.training


def _print_outputs(summary: dict[str, Any]) -> None:
    evaluation = summary.get("evaluation")
    if evaluation:
        known = ("split", "store", "samples", "predictions")
        scores = "  ".join(f"{k} {_pct(v) if k == 'accuracy' else _num(v)}" for k, v in evaluation.items()
                           if k not in known and isinstance(v, (int, float)))
        out.print(f"{evaluation['split']} ({evaluation['samples']} samples): {scores}", soft_wrap=True)
    for label, key in (("predictions", "predictions"), ("curves", "curves"), ("flow run", "flow_run")):
        if summary.get(key):
            out.print(f"{label}: {escape(str(summary[key]))}", soft_wrap=True)


# -- predict, report, deploy ----------------------------------------------------------------------


@app.command()
def predict(
    config: Annotated[Path, typer.Argument(help="The run config the model was trained with (model, normalisation, cluster).")],
    checkpoint: Annotated[str, typer.Option(help="model.safetensors, a checkpoint directory, or a run directory (a path or URL).")],
    input_store: Annotated[str, typer.Option("--input", help="Zarr store with the inputs array (a path or URL).")],
    output_store: Annotated[str, typer.Option("--output", help="Zarr store to write (arrays predictions, labels; a path or URL).")],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a config key (repeatable).")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output store.")] = False,
) -> None:
    """Batch inference from Zarr to Zarr, chunk by chunk on the workers of the config's cluster."""
    from dasktrain.cluster import open_cluster, upload_user_code
    from dasktrain.config import load_config
    from dasktrain.inference import predict as run_predict
    from dasktrain.storage import check_url, locate

    with _user_errors():
        cfg = load_config(config, overrides or [])
        for key, given in (("--checkpoint", checkpoint), ("--input", input_store), ("--output", output_store)):
            check_url(given, key)  # before the cluster starts: a URL no filesystem can open is one line
        target = locate(output_store, cfg.storage_options, "--output")
        with open_cluster(cfg.cluster) as client:
            upload_user_code(client, cfg.model.upload)  # the workers build the model
            written = run_predict(client, cfg, checkpoint, input_store, target, overwrite=overwrite)
    out.print(f"wrote {escape(written['store'])}: {written['samples']} samples in {written['chunks']} chunks, "
              f"arrays {', '.join(written['arrays'])}", soft_wrap=True)


@app.command()
def report(
    run_dir: Annotated[str, typer.Argument(metavar="RUN_DIR", help="A run directory (holds metrics.jsonl), a path or URL.")],
    png: Annotated[str | None, typer.Option("--out", help="Where to write the PNG (default: RUN_DIR/curves.png).")] = None,
) -> None:
    """Draw a run's loss and accuracy curves as a PNG (the flow's artifact, without Prefect)."""
    from dasktrain.report import epoch_table, plot_curves

    with _user_errors():
        path = plot_curves(run_dir, png)
        rows = epoch_table(run_dir)
    table = Table(title="epochs", title_justify="left")
    for name in ("epoch", "train loss", "val loss", "val accuracy"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(str(r["epoch"] + 1), _num(r.get("train_loss")), _num(r.get("val_loss")), _pct(r.get("val_accuracy")))
    out.print(table)
    out.print(f"curves: {escape(str(path))}", soft_wrap=True)


@app.command()
def deploy(
    config: Annotated[Path, typer.Argument(help="Run config (YAML) the scheduled runs train.")],
    cron: Annotated[str | None, typer.Option(help='Cron schedule, e.g. "0 2 * * *" (every day at 02:00).')] = None,
    interval: Annotated[float | None, typer.Option(min=1, help="Or: seconds between runs.")] = None,
    name: Annotated[str | None, typer.Option(help="Deployment name (default: the config file's name).")] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a config key (repeatable).")
    ] = None,
) -> None:
    """Serve a scheduled deployment of the training flow on the server of PREFECT_API_URL; stays up
    and runs the flow on schedule, each run in its own directory under output_dir, until stopped."""
    if (cron is None) == (interval is None):
        raise typer.BadParameter("give exactly one of --cron or --interval")
    from dasktrain.config import load_config

    with _user_errors():
        load_config(config, overrides or [])  # a bad config fails now, not at 02:00
        _import_flows()
        from dasktrain.flows.deployments import serve_training

        serve_training(config, name=name, cron=cron, interval=interval, overrides=overrides or [])


# -- cluster show ---------------------------------------------------------------------------------

cluster_app = typer.Typer(help="The cluster a run config names: see it resolved, before submitting anything.",
                          no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("show")
def cluster_show(
    config: Annotated[Path, typer.Argument(help="Run config (YAML) whose cluster section to resolve.")],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a config key (repeatable).")
    ] = None,
) -> None:
    """Print the resolved cluster spec and, for jobqueue kinds (slurm, pbs, sge, lsf), the dask-jobqueue
    arguments merged onto the site's jobqueue config (each with where it came from) and the exact
    job script each worker job is submitted with. Submits nothing and starts no scheduler."""
    import yaml

    from dasktrain.cluster import jobqueue_script, workers_to_start
    from dasktrain.config import JOBQUEUE_KINDS, load_config

    with _user_errors():
        cfg = load_config(config, overrides or [])
        spec = cfg.cluster
        plan, script = jobqueue_script(spec) if spec.kind in JOBQUEUE_KINDS else (None, None)
    lines = [f"# {spec.source}", yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True), sort_keys=False)]
    if plan is not None and script is not None:
        workers = spec.workers or 1
        jobs = -(-workers // plan.processes)
        start = min(workers, workers_to_start(cfg))
        lines += ["", f"# {jobs} job(s) of {plan.processes} worker process(es) for cluster.workers={workers}; training "
                  f"starts once {start} worker(s) are up (train.min_workers), the others join as their jobs start",
                  f"# dask_jobqueue.{plan.class_name} arguments, merged onto the site's jobqueue.{spec.kind} config:",
                  *(f"{key}: {json.dumps(value)}  # {origin}" for key, (value, origin) in plan.merged.items()),
                  "",
                  "# job script (dask-jobqueue's job_script(); the scheduler's address is filled in at submission):",
                  script.rstrip()]
    # Text, not markup: job scripts hold brackets; soft_wrap: each line whole, to be copied.
    out.print(Text("\n".join(line.rstrip("\n") for line in lines)), soft_wrap=True)


class _ProgressView:
    """Draws the driver's events: a progress bar over the run's steps, a line per epoch."""

    def __init__(self, config: RunConfig, per_token: bool = False) -> None:
        self.epochs = config.train.epochs
        self.per_token = per_token
        self.dashboard = config.cluster.dashboard
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("step {task.fields[step]}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} samples/s"),
            TextColumn("{task.fields[pipeline]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=out,
        )
        self.task: TaskID | None = None
        self.steps_per_epoch = 1
        self.rate: float | None = None

    def __enter__(self) -> _ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def on_event(self, event: Event) -> None:
        kind = event["kind"]
        if kind == "start":
            self._start(event)
        elif kind == "step" and self.task is not None:
            # The per-step rate is noisy (submit-ahead makes steps arrive in bursts): smooth it.
            rate = float(event["samples_per_s"])
            self.rate = rate if self.rate is None else 0.9 * self.rate + 0.1 * rate
            self.progress.update(
                self.task, completed=event["global_step"] + 1,
                description=f"epoch {event['epoch'] + 1}/{self.epochs}",
                step=f"{event['step'] + 1}/{self.steps_per_epoch}",
                loss="skipped (not finite)" if event.get("skipped") else f"{event['loss']:.4f}",
                rate=f"{self.rate:,.0f}",
                pipeline=_pipeline_text(event),
            )
        elif kind == "epoch":
            self.progress.console.print(_epoch_line(event, self.epochs, self.per_token), soft_wrap=True)
        elif kind == "regroup":
            changes = [f"lost {len(event['lost'])}" if event["lost"] else "",
                       f"joined {len(event['joined'])}" if event["joined"] else ""]
            self.progress.console.print(
                f"[yellow]workers changed ({escape(str(event['reason']))}; {', '.join(c for c in changes if c) or 'regrouped'}): "
                f"going on with {event['workers']} worker(s) from global step {event['global_step']}", soft_wrap=True)

    def _start(self, event: Event) -> None:
        self.steps_per_epoch = event["steps_per_epoch"]
        start, end = event["start_step"], event["end_step"]
        workers = event["workers"]
        console = self.progress.console
        console.print(f"run dir {escape(event['run_dir'])}: {len(workers)} worker(s), "
                      f"{self.steps_per_epoch} steps per epoch, steps {start}..{end}", soft_wrap=True)
        # The scheduler registers its HTTP server as "dashboard" even with the dashboard off, so
        # the event's link alone does not say a dashboard is served: the config does.
        if event.get("dashboard") and self.dashboard:
            note = "" if importlib.util.find_spec("bokeh") else " (install bokeh to see it: pip install 'dasktrain[dashboard]')"
            console.print(f"Dask dashboard: {escape(event['dashboard'])}{escape(note)}", soft_wrap=True)
        epoch = start // self.steps_per_epoch
        self.task = self.progress.add_task(
            f"epoch {epoch + 1}/{self.epochs}", total=end, completed=start,
            step=f"-/{self.steps_per_epoch}", loss="-", rate="-", pipeline="",
        )


def _pipeline_text(event: Event) -> str:
    """Pipeline-parallel steps: measured efficiency against the schedule's bound m/(m+P-1),
    and each stage's busy time."""
    if "pipeline_efficiency" not in event:
        return ""
    busy = "/".join(f"{1e3 * b:.0f}" for b in event.get("stage_busy_s", []))
    return f"pipe {event['pipeline_efficiency']:.0%}/{event['efficiency_bound']:.0%} busy {busy}ms"


def _epoch_line(record: dict[str, Any], epochs: int, per_token: bool = False) -> str:
    """One epoch's numbers; ``per_token``: the losses are nats per token, and the validation loss
    is given in bits per token too."""
    parts = [f"epoch {record['epoch'] + 1}/{epochs}", f"train loss {_num(record.get('train_loss'))}"]
    if "val_loss" in record:
        bits = f" ({_bits(record['val_loss'])} bits/token)" if per_token else ""
        parts.append(f"val loss {_num(record['val_loss'])}{bits}")
    if "val_accuracy" in record:
        parts.append(f"val accuracy {_pct(record['val_accuracy'])}")
    parts += [f"{key.replace('_', ' ')} {_num(record[key])}" for key in _own_metrics([record])]
    parts.append(f"{record['samples_per_s']:,.0f} samples/s")
    return "  ".join(parts)


def _own_metrics(records: list[dict[str, Any]]) -> list[str]:
    """The keys of the run's own metrics (``metrics``: ``val_<name>``) in epoch records."""
    known = {"val_loss", "val_accuracy", "val_samples"}
    return sorted({k for r in records for k in r if k.startswith("val_") and k not in known})


def _print_run(result: RunResult, config: RunConfig, run_args: list[str], per_token: bool = False) -> None:
    from dasktrain.metrics import METRICS_FILE, read_metrics
    from dasktrain.run_dir import CONFIG_FILE

    # From metrics.jsonl rather than result.epochs: after --resume it also holds earlier epochs.
    epochs = [r for r in read_metrics(result.run_dir) if r.get("kind") == "epoch"]
    table = Table(title="epochs", title_justify="left")
    # per_token: losses are nats per token (a sequence model); a column gives validation bits per token.
    own = _own_metrics(epochs)
    names = ("epoch", "train loss", "val loss", *(("val bits/token",) if per_token else ()), "val accuracy",
             *(k.replace("_", " ") for k in own), "samples/s")
    for name in names:
        table.add_column(name, justify="right")
    for r in epochs:
        bits = (_bits(r.get("val_loss")),) if per_token else ()
        table.add_row(str(r["epoch"] + 1), _num(r.get("train_loss")), _num(r.get("val_loss")), *bits,
                      _pct(r.get("val_accuracy")), *(_num(r.get(k)) for k in own), f"{r['samples_per_s']:,.0f}")
    out.print(table)
    run_dir = escape(str(result.run_dir))
    if result.completed:
        out.print(f"model:   {escape(str(result.model_path))}", soft_wrap=True)
    else:
        done = epochs[-1]["epoch"] + 1 if epochs else 0
        out.print(f"stopped after epoch {done} of {config.train.epochs} (global step {result.steps}); continue with: "
                  f"dasktrain run {escape(shlex.join(run_args))} --resume", soft_wrap=True)
    out.print(f"metrics: {run_dir}/{METRICS_FILE}", soft_wrap=True)
    out.print(f"config:  {run_dir}/{CONFIG_FILE}", soft_wrap=True)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _bits(nats: float | None) -> str:
    return "-" if nats is None else f"{nats / math.log(2):.3f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


if __name__ == "__main__":
    app()
