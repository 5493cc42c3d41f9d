"""The training flow: prepare, train, evaluate, publish, as Prefect tasks over one Dask cluster.

Orchestration only: each stage calls into ``pipeline``. The flow opens the cluster (or connects to
``cluster.kind: address``) once the prepare stage has read the config, hands its client to the
stages, and closes it in ``finally``, whichever stage fails. Training steps are never Prefect
tasks: the train stage is one task around the driver, so Prefect costs a fixed few seconds per
run, not per step.

Flow parameters must be JSON-serialisable (they are stored with the flow run and a deployment),
so the config travels as a path (deployments), a mapping, or a validated :class:`RunConfig`
(``dasktrain run``: Prefect stores it as its mapping, and the prepare stage takes it as it is,
without reading or validating it again). What is not serialisable reaches the stages from the
process that calls the flow: the CLI's progress display through :data:`EVENT_HOOK`, and the
checks the CLI already made (:class:`~dasktrain.preflight.Preflight`) through
:data:`HANDED_PREFLIGHT`, which the prepare stage uses instead of checking again.
"""

from __future__ import annotations

import base64
import inspect
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed import Client
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.runtime import deployment as served_deployment
from prefect.runtime import flow_run, task_run
from prefect.utilities.annotations import quote
from safetensors.torch import load_file

from dasktrain import hf_support, inference, report, run_loop
from dasktrain.checkpoint import latest_checkpoint
from dasktrain.config import RunConfig, check_flow_run_overrides, load_config, validate_config
from dasktrain.errors import ClusterError, ConfigError
from dasktrain.flows import prefect_api
from dasktrain.flows.progress import PrefectProgress
from dasktrain.models import build_model
from dasktrain.preflight import Preflight
from dasktrain.prepare import prepare_data
from dasktrain.run_dir import MODEL_FILE, run_location
from dasktrain.storage import AnyPath, is_url, locate

EVENT_HOOK: Callable[[run_loop.Event], None] | None = None
"""Receives the driver's events during the train stage when set (the CLI's progress display)."""

HANDED_PREFLIGHT: Preflight | None = None
"""Checks already made in this process for the config the flow is given (``dasktrain run`` makes
them before Prefect starts); the prepare stage uses them when they fit its config."""

PREDICTIONS_STORE = "predictions.zarr"
TRAIN_RETRIES = 2

_RETRIED: tuple[type[BaseException], ...] = (ClusterError, TimeoutError, ConnectionError)
"""Errors a retry can get past: the cluster (workers lost for good, a scheduler gone, a
connection dropped). Everything else (bad input, a model that fails on its data, a diverging
run, a mismatched checkpoint, a full disk) would only repeat, so the train task fails at once."""


class FlowCluster:
    """The flow's Dask cluster: opened by the flow on first use, once the config is known, and
    closed by the flow (a cluster reached by address is only disconnected from)."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self.client: Client | None = None

    def open(self, config: RunConfig) -> Client:
        if self.client is None:
            from dasktrain.cluster import open_cluster, workers_to_start

            # Jobqueue clusters: training starts once train.min_workers are up; later jobs join it.
            self.client = self._stack.enter_context(open_cluster(config.cluster, start_with=workers_to_start(config)))
        return self.client

    def close(self) -> None:
        self.client = None
        self._stack.close()


@dataclass(frozen=True)
class Prepared:
    config: RunConfig
    facts: dict[str, Any]
    checked: Preflight
    """The checks of the store and model against ``config``, made once, for the train stage."""
    artifact_key: str
    """Prefix of the flow run's artifact keys (:func:`run_artifact_key`)."""


def config_of(config: RunConfig | str | dict[str, Any], overrides: list[str]) -> RunConfig:
    """The flow's ``config`` parameter as a validated config: a :class:`RunConfig` as it is, a mapping
    validated, a YAML path read (with ``overrides``; the other forms take none)."""
    if isinstance(config, RunConfig):
        cfg = config
    elif isinstance(config, str):
        return load_config(config, overrides)
    else:
        cfg = validate_config(config, source="flow parameter config")
    if overrides:
        raise ConfigError("overrides apply to a config file; with a mapping or a RunConfig, change the config itself")
    return cfg


@task(name="prepare", cache_policy=NONE)
def prepare(config: RunConfig | str | dict[str, Any], overrides: list[str], cluster: FlowCluster,
            per_run_output: bool = False) -> Prepared:
    """Read and validate the config (unless it came validated), ingest the store if only its source
    exists, check the store and model (unless :data:`HANDED_PREFLIGHT` did for this config), start
    the cluster, and compute normalisation statistics on it."""
    cfg = config_of(config, overrides)
    key = run_artifact_key(cfg)  # of the output directory the config names, before a run's own below it
    if per_run_output:  # a scheduled run retrains from fresh data: its own directory, never a resume
        label = f"{flow_run.scheduled_start_time:%Y%m%d-%H%M%S}-{flow_run.name}"
        cfg = cfg.model_copy(update={"output_dir": str(run_location(cfg) / label)})
    checked, facts = prepare_data(cfg, lambda: cluster.open(cfg), checked=HANDED_PREFLIGHT)
    get_run_logger().info("prepared %s: %d samples in %d chunks, %d workers%s", facts["store"], facts["samples"],
                          facts["chunks"], facts["workers"], ", normalised" if facts["normalized"] else "")
    return Prepared(cfg, facts, checked, key)


def _worth_retrying(task: Any, run: Any, state: Any) -> bool:
    error = state.result(raise_on_failure=False)
    return isinstance(error, _RETRIED) or type(error).__name__ == "CommClosedError"


@task(name="train", cache_policy=NONE, retries=TRAIN_RETRIES, retry_delay_seconds=1, retry_condition_fn=_worth_retrying)
def train(config: RunConfig, client: Client, resume: bool, until_epoch: int | None,
          checked: Preflight | None = None, artifact_key: str = "dasktrain-run") -> dict[str, Any]:
    """The training run, on the checks the prepare stage made (``checked``). A retry goes on from
    the newest checkpoint that the failed try wrote, so the epochs it finished are not trained again.
    Reports as it trains: a line per epoch in the task's logs, and the progress artifact
    ``<artifact_key>-progress`` (:class:`~dasktrain.flows.progress.PrefectProgress`)."""
    retrying = task_run.run_count > 1 and latest_checkpoint(run_location(config)) is not None
    if retrying:
        get_run_logger().warning("try %d: resuming from %s", task_run.run_count, latest_checkpoint(run_location(config)))
    result = run_loop.train(config, client=client, resume=resume or retrying, until_epoch=until_epoch,
                            on_event=EVENT_HOOK, checked=checked,
                            observers=[PrefectProgress(f"{artifact_key}-progress", config.train.epochs)])
    return {"run_dir": str(result.run_dir), "steps": result.steps, "completed": result.completed,
            "epochs": result.epochs, "tries": task_run.run_count}


@task(name="evaluate", cache_policy=NONE)
def evaluate(config: RunConfig, client: Client) -> dict[str, Any]:
    """Loss and accuracy (or error) on the test split, chunk-parallel on the workers; predictions
    for every sample of the test store (or the training store) into the run directory."""
    run_dir = run_location(config)
    model = run_dir / MODEL_FILE
    result = inference.evaluate(client, config, model, inference.evaluation_split(config))
    source = config.data.test_store or config.data.store
    result["predictions"] = inference.predict(client, config, model, source, run_dir / PREDICTIONS_STORE, overwrite=True)
    get_run_logger().info("evaluation on %s: %s", result["split"],
                          {k: v for k, v in result.items() if k in ("loss", "accuracy", "error")})
    return result


@task(name="publish", cache_policy=NONE)
def publish(config: RunConfig, prepared: dict[str, Any], trained: dict[str, Any],
            evaluation: dict[str, Any] | None, artifact_key: str = "dasktrain-run") -> dict[str, Any]:
    """The loss curve PNG and evaluation in the run directory; the summary, the epoch table and the
    curves (the PNG inside a markdown artifact, so a remote UI shows it) as Prefect artifacts keyed
    ``<artifact_key>-...``. A completed run whose model is a Hugging Face ``PreTrainedModel`` is also
    written as a directory ``from_pretrained`` loads (``hf/`` in the run directory)."""
    run_dir = run_location(config)
    pretrained = None
    # Built only when it may be a Hugging Face model: a look-up in sys.modules decides for any other.
    # (Not for a run directory on object storage: save_pretrained writes files on a filesystem.)
    if trained["completed"] and isinstance(run_dir, Path) and hf_support.may_be_pretrained(config.model.factory):
        model = build_model(config.model, config.train.seed)
        model.load_state_dict(load_file(str(run_dir / MODEL_FILE)))
        pretrained = hf_support.save_pretrained_dir(model, run_dir / hf_support.PRETRAINED_DIR)
    epochs = [r for r in report.epoch_table(run_dir)]
    facts: dict[str, Any] = {
        **prepared, "config_digest": config.digest(), "run_dir": str(run_dir.resolve()),
        "epochs": config.train.epochs, "epochs_done": len(epochs), "steps": trained["steps"],
        "completed": trained["completed"], "train_tries": trained["tries"],
        "final_epoch": epochs[-1] if epochs else None, "evaluation": evaluation,
        "metrics": str((run_dir / "metrics.jsonl").resolve()),
        "model": str((run_dir / MODEL_FILE).resolve()) if trained["completed"] else None,
        "hf_pretrained": str(pretrained.resolve()) if pretrained is not None else None,
        "predictions": evaluation["predictions"]["store"] if evaluation else None,
        "curves": str(report.plot_curves(run_dir).resolve()),
        "flow_run": flow_run.name, "flow_run_id": str(flow_run.id),
    }
    if evaluation is not None:
        report.write_evaluation(run_dir, evaluation)
    create_markdown_artifact(markdown=report.summary_markdown(facts), key=f"{artifact_key}-summary",
                             description=f"dasktrain run {run_dir}")
    if epochs:
        create_table_artifact(table=epochs, key=f"{artifact_key}-epochs", description=f"per-epoch metrics of {run_dir}")
        create_markdown_artifact(markdown=curves_markdown(locate(facts["curves"], config.storage_options)), key=f"{artifact_key}-curves",
                                 description=f"loss and accuracy curves of {run_dir}")
    return facts


def curves_markdown(png: AnyPath) -> str:
    """The curves PNG inside markdown, as a ``data:`` URI: the UI shows it with no access to the file."""
    encoded = base64.b64encode(png.read_bytes()).decode("ascii")
    return f"![loss and accuracy curves](data:image/png;base64,{encoded})"


@flow(name="dasktrain-training")
def training_flow(config: str | dict[str, Any], overrides: list[str] | None = None, resume: bool = False,
                  until_epoch: int | None = None, per_run_output: bool = False,
                  deployment_overrides: list[str] | None = None) -> dict[str, Any]:
    """Prepare the data, train on a Dask cluster, evaluate and publish; returns the run summary.

    ``config`` is a YAML path (with ``overrides``) or the config as a mapping (``dasktrain run``
    hands over the config it read, validated, as a mapping: parameters stay JSON, which a flow run
    of a served deployment also validates them as); ``per_run_output``
    puts the run in its own directory under ``output_dir`` (scheduled deployments);
    ``deployment_overrides``, the deployment owner's (``dasktrain deploy --set``), apply before
    ``overrides``. A flow run of a deployment may change only ``overrides``, and only with keys of
    :data:`~dasktrain.config.FLOW_RUN_OVERRIDE_KEYS` (:func:`check_deployment_run`)."""
    check_deployment_run({"config": config, "overrides": overrides, "resume": resume, "until_epoch": until_epoch,
                          "per_run_output": per_run_output, "deployment_overrides": deployment_overrides})
    cluster = FlowCluster()
    try:
        prepared = prepare(config, [*(deployment_overrides or []), *(overrides or [])], cluster, per_run_output)
        cfg, client = prepared.config, cluster.open(prepared.config)
        # Quoted: the train task gets it as it is, without Prefect walking every chunk of the splits.
        checked: Any = quote(prepared.checked)
        trained = train(cfg, client, resume, until_epoch, checked, prepared.artifact_key)
        evaluation = evaluate(cfg, client) if trained["completed"] else None
        return publish(cfg, prepared.facts, trained, evaluation, prepared.artifact_key)
    finally:
        cluster.close()


def check_deployment_run(parameters: dict[str, Any]) -> None:
    """In a flow run created from a deployment, refuse (before anything runs) parameters that the
    deployment's owner did not set: every parameter but ``overrides`` must be the deployment's own
    (or the flow's default), and each override that is not one of the deployment's own ``overrides``
    must set a key of :data:`~dasktrain.config.FLOW_RUN_OVERRIDE_KEYS` to a plain value, so that a
    flow run can change data and numbers, never which code runs. A direct call of the flow (and
    ``dasktrain run``) is not restricted: the caller runs their own code.

    The deployment is told by the flow run's ``deployment_id``, which the server sets when it
    creates the run; the owner's parameters are read from the deployment itself, not from the run."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    deployment_id = context.flow_run.deployment_id if context and context.flow_run else None
    if deployment_id is None:
        return
    try:
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment(deployment_id)
    except Exception as exc:  # fail closed: without the owner's parameters nothing is trusted
        raise ConfigError(f"cannot read deployment {deployment_id} to check the flow run's parameters: "
                          f"{type(exc).__name__}: {exc}") from None
    source = f"flow run of deployment {deployment.name!r}"
    signature = inspect.signature(training_flow.fn)
    owner = {name: deployment.parameters.get(name, signature.parameters[name].default) for name in parameters}
    for name, value in parameters.items():
        # None, False and [] alike: a parameter left out of the deployment has the flow's default.
        if name != "overrides" and (value or None) != (owner[name] or None):
            raise ConfigError(f"{source}: parameter {name!r} refused: it is the deployment's own; a flow run may "
                              "pass only overrides of data keys (see dasktrain.config.FLOW_RUN_OVERRIDE_KEYS)")
    trusted = owner["overrides"] or []
    check_flow_run_overrides([o for o in parameters["overrides"] or [] if o not in trusted], source)


def run_artifact_key(config: RunConfig) -> str:
    """Prefix of a flow run's artifact keys, the same for every run of one deployment so that its
    artifacts build a history in the UI: ``dasktrain-<deployment name>``; outside a deployment,
    ``dasktrain-<name of the config's output directory>``. Prefect keys hold only lowercase
    letters, digits and dashes."""
    name = served_deployment.name or Path(config.output_dir).name
    slug = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-") or "run"
    return f"dasktrain-{slug}"


@contextmanager
def event_hook(hook: Callable[[run_loop.Event], None] | None) -> Iterator[None]:
    """Set :data:`EVENT_HOOK` for the block."""
    global EVENT_HOOK
    previous, EVENT_HOOK = EVENT_HOOK, hook
    try:
        yield
    finally:
        EVENT_HOOK = previous


@contextmanager
def handed_preflight(checked: Preflight | None) -> Iterator[None]:
    """Set :data:`HANDED_PREFLIGHT` for the block."""
    global HANDED_PREFLIGHT
    previous, HANDED_PREFLIGHT = HANDED_PREFLIGHT, checked
    try:
        yield
    finally:
        HANDED_PREFLIGHT = previous


def run_training(config: RunConfig | str | Path, overrides: list[str] | None = None, resume: bool = False,
                 until_epoch: int | None = None, on_event: Callable[[run_loop.Event], None] | None = None,
                 db_dir: str | Path | None = None, checked: Preflight | None = None) -> dict[str, Any]:
    """Run :func:`training_flow` as ``dasktrain run`` does: against ``PREFECT_API_URL`` (checked
    first), or Prefect's local server with its database in ``db_dir`` (default: the parent of the
    run's output directory, e.g. ``runs/``).

    ``config`` is a validated config, or a YAML path read here (once, with ``overrides``); the flow
    gets the validated config. ``checked``: the checks of the store and model already made for
    it (:func:`dasktrain.preflight.preflight`), which the flow then does not make again.
    The flow is given the validated config as a mapping (validated again there, which reads no
    file but a named cluster spec)."""
    cfg = config_of(str(config) if isinstance(config, Path) else config, list(overrides or []))
    if db_dir is None:
        # Beside the run directory; a run on object storage keeps its Prefect database here, locally.
        db_dir = (Path.cwd() if is_url(cfg.output_dir) else Path(cfg.output_dir).resolve().parent) / ".prefect"
    with prefect_api(db_dir), event_hook(on_event), handed_preflight(checked):
        return training_flow(cfg.model_dump(mode="json"), [], resume, until_epoch)
