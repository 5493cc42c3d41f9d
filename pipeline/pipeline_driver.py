"""The pipeline-parallel driver: stages as worker-pinned actors, one call per stage per step.

``train_pipeline`` is what :func:`dasktrain.driver.train` runs when ``parallel.pipeline > 1``;
it takes the same arguments, returns the same :class:`RunResult` and emits the same event kinds.

The driver places R x P stage actors (replica ``r``'s stage ``s`` on worker ``r * P + s``),
wires each to its neighbours and its peers in the other replicas, then, every step, calls
``run_step(t)`` on all of them at once and waits for their small stats. Activations, their
gradients and the replicas' gradient sums move between the actors (see
:mod:`dasktrain.stage_actor`); the driver sends step numbers and receives numbers.

Checkpoints: at a checkpoint step, replica 0's stages write their parts into a temporary
directory, the driver adds ``state.json`` (the manifest: step, config digest, the stage bounds)
and renames the directory into place, so it is complete or absent, as in data parallelism.

A lost stage: while waiting, the driver checks that every stage's worker is still alive. When
one is gone it aborts the other stages, re-creates all of them from the newest checkpoint (the
lost one on another worker, the rest where they were) and goes on from that step: the same
trajectory as an uninterrupted run.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distributed import Client

from dasktrain.checkpoint import CHECKPOINTS, DATA_LAYOUT, fsync_dir, latest_checkpoint, list_checkpoints, save_model
from dasktrain.config import RunConfig
from dasktrain.errors import CheckpointError, ClusterError, ConfigError, DasktrainError
from dasktrain.metrics import MetricsLog
from dasktrain.objective import lr_at
from dasktrain.plan import SamplingPlan
from dasktrain.preflight import DataSplits, build_plan, check_model_fits, resolve_splits
from dasktrain.run_lock import run_lock
from dasktrain.stage_actor import PipelineStage, StageAborted, StageSpec
from dasktrain.stages import StageLayout, plan_stages

log = logging.getLogger(__name__)

Event = dict[str, Any]

STEP_TIMEOUT_S = 600.0
"""Longest one step may take before the run is declared stuck."""
POLL_S = 1.0
"""How often a waiting driver checks that the stages' workers are alive."""
WORKER_WAIT_S = 60.0
"""Longest the driver waits for a replacement worker after losing one."""
MAX_RECOVERIES = 5
"""Lost stages re-created in one run before it gives up."""


class StageLost(ClusterError):
    """A stage's worker left the cluster during a step."""


def train_pipeline(
    config: RunConfig,
    *,
    client: Client | None = None,
    resume: bool = False,
    until_epoch: int | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> Any:
    """Pipeline-parallel training of ``config``; see :func:`dasktrain.driver.train` for the arguments."""
    from dasktrain.driver import client_for, run_span  # driver dispatches here: import late

    splits = resolve_splits(config)
    plan = build_plan(config, splits)
    layout = plan_stages(config, splits.train.inputs.sample_shape)
    if not layout.named:
        check_model_fits(config, splits.train)
    par = config.parallel
    precision = config.train.precision
    if precision != "fp32":
        raise ConfigError(
            f"train.precision={precision} is not supported with parallel.pipeline={par.pipeline} yet; "
            "pipeline stages train in fp32 (set train.precision: fp32)"
        )
    per_replica = config.train.batch_size // par.data
    if par.micro_batches > per_replica:
        raise ConfigError(
            f"parallel.micro_batches={par.micro_batches} is larger than the batch each pipeline replica gets "
            f"(train.batch_size={config.train.batch_size} / parallel.data={par.data} = {per_replica} samples); "
            f"needs parallel.micro_batches <= {per_replica}"
        )
    run_dir = Path(config.output_dir)
    with run_lock(run_dir, "train"):  # one writer per run directory, released on every exit
        start_step, end_step = run_span(config, run_dir, plan, resume, until_epoch)
        if start_step:
            layout = _layout_of(latest_checkpoint(run_dir), layout)
        emit = on_event or (lambda event: None)
        with client_for(config, client) as c:
            return _PipelineSession(config, c, splits, plan, layout, run_dir, start_step, end_step, emit).run()


def _layout_of(ckpt: Path | None, layout: StageLayout) -> StageLayout:
    """A resumed run keeps the cuts it was checkpointed with (time balancing may measure others now)."""
    if ckpt is None:
        return layout
    manifest = json.loads((ckpt / "state.json").read_text())
    if "stages" not in manifest:
        raise CheckpointError(f"checkpoint {ckpt} was not written by a pipeline-parallel run")
    bounds = tuple((int(lo), int(hi)) for lo, hi in manifest["stages"])
    return StageLayout(bounds, layout.layers, layout.named)


class _PipelineSession:
    """One pipeline-parallel run on a connected client."""

    def __init__(self, config: RunConfig, client: Client, splits: DataSplits, plan: SamplingPlan,
                 layout: StageLayout, run_dir: Path, start_step: int, end_step: int,
                 emit: Callable[[Event], None]) -> None:
        self.config = config
        self.client = client
        self.splits = splits
        self.plan = plan
        self.layout = layout
        self.run_dir = run_dir
        self.start_step = start_step
        self.end_step = end_step
        self.emit = emit
        self.run_id = uuid.uuid4().hex[:10]
        self.P = layout.stages
        self.R = config.parallel.data
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
        need = self.R * self.P
        if len(workers) < need:
            raise ClusterError(
                f"parallel.pipeline={self.P} stages x parallel.data={self.R} replicas needs {need} workers "
                f"(one per stage), found {len(workers)}; add workers or lower parallel.pipeline/parallel.data"
            )
        self.placement = workers[:need]
        """Worker of each stage, index ``r * P + s``."""
        self.actors: list[Any] = []
        self.futures: list[Any] = []
        self.generation = 0
        self.recoveries = 0
        from dasktrain.driver import data_layout  # driver dispatches here: import late

        self.data_layout = data_layout(config)  # recorded in every checkpoint

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> Any:
        from dasktrain.driver import MODEL_FILE, SUMMARY_FILE, RunResult

        metrics = MetricsLog(self.run_dir, resume_step=self.start_step if self.start_step else None)
        try:
            resume_from = latest_checkpoint(self.run_dir) if self.start_step else None
            self._create_stages(resume_from)
            self.emit({"kind": "start", "start_step": self.start_step, "end_step": self.end_step,
                       "steps_per_epoch": self.plan.steps_per_epoch, "workers": list(self.placement),
                       "stages": [list(b) for b in self.layout.bounds], "dashboard": None,
                       "run_dir": str(self.run_dir)})
            epochs, metrics = self._loop(metrics)
            completed = self.end_step == self.config.train.epochs * self.plan.steps_per_epoch
            if completed:
                save_model(self.run_dir / MODEL_FILE, self._weights())
            result = RunResult(self.run_dir, self.end_step, completed, epochs)
            (self.run_dir / SUMMARY_FILE).write_text(json.dumps(
                {"steps": self.end_step, "completed": completed, "epochs": epochs,
                 "recoveries": self.recoveries}, indent=1))
            self.emit({"kind": "end", "completed": completed, "steps": self.end_step, "epochs": epochs})
            return result
        finally:
            metrics.close()
            self._drop_stages()

    def _loop(self, metrics: MetricsLog) -> tuple[list[dict[str, Any]], MetricsLog]:
        spe = self.plan.steps_per_epoch
        epochs: list[dict[str, Any]] = []
        step_stats: dict[int, dict[str, Any]] = {}
        t = self.start_step
        while t < self.end_step:
            began = time.perf_counter()
            ckpt_dir = self._checkpoint_tmp(t + 1) if self._checkpoint_after(t) else None
            try:
                stats = self._wait(self._submit_step(t, ckpt_dir), t)
            except StageLost as exc:
                if ckpt_dir is not None:
                    shutil.rmtree(ckpt_dir, ignore_errors=True)
                t = self._recover(exc)
                metrics.close()
                metrics = MetricsLog(self.run_dir, resume_step=t)
                step_stats = {s: v for s, v in step_stats.items() if s < t}
                epochs = [e for e in epochs if e["end_step"] <= t]
                continue
            if ckpt_dir is not None:
                self._commit_checkpoint(ckpt_dir, t + 1)
            record = self._step_record(t, stats, time.perf_counter() - began)
            step_stats[t] = record
            metrics.write(record)
            self.emit(record)
            t += 1
            if t % spe == 0:
                record = _epoch_record(t // spe - 1, t, [step_stats[s] for s in range(t - spe, t) if s in step_stats],
                                       self.config.loss)
                epochs.append(record)
                metrics.write(record)
                self.emit(record)
        return epochs, metrics

    def _submit_step(self, t: int, ckpt_dir: Path | None) -> list[Any]:
        """Call ``run_step(t)`` on every stage (replica 0's stages also write their checkpoint parts)."""
        try:
            return [a.run_step(t, str(ckpt_dir) if ckpt_dir is not None and i < self.P else None)
                    for i, a in enumerate(self.actors)]
        except Exception as exc:  # Dask refuses calls on an actor whose worker it knows is gone
            self._check_alive(t)
            raise ClusterError(f"global step {t} could not start: {exc}; {self._last_good()}") from None

    def _wait(self, futures: list[Any], t: int) -> list[dict[str, Any]]:
        """The stats of every stage's step ``t``; raises :class:`StageLost` when a stage's worker died."""
        deadline = time.monotonic() + STEP_TIMEOUT_S
        results: list[dict[str, Any] | None] = [None] * len(futures)
        try:
            for i, future in enumerate(futures):
                while results[i] is None:
                    try:
                        results[i] = future.result(timeout=POLL_S)
                    except (TimeoutError, concurrent.futures.TimeoutError):
                        # Only a slow step pays for this look at the scheduler.
                        self._check_alive(t)
                        if time.monotonic() > deadline:
                            raise ClusterError(
                                f"global step {t} did not finish in {STEP_TIMEOUT_S:.0f} s (stage {i % self.P}, "
                                f"replica {i // self.P}, worker {self.placement[i]})"
                            ) from None
        except StageLost:
            raise
        except (StageAborted, OSError) as exc:
            # A neighbour's worker died: the survivors see an aborted step or a closed connection.
            self._check_alive(t)
            raise ClusterError(f"global step {t} failed: {exc}; {self._last_good()}") from None
        except DasktrainError as exc:
            self._abort(f"stage failed at step {t}")
            raise type(exc)(f"{exc}; {self._last_good()}") from None
        except Exception as exc:  # a lost actor can surface as any comm error; find out which
            self._check_alive(t)
            raise ClusterError(f"global step {t} failed: {type(exc).__name__}: {exc}; {self._last_good()}") from None
        return results  # type: ignore[return-value]

    def _check_alive(self, t: int) -> None:
        alive = set(self.client.scheduler_info(n_workers=-1)["workers"])
        lost = [i for i, addr in enumerate(self.placement) if addr not in alive]
        if lost:
            names = ", ".join(f"stage {i % self.P} of replica {i // self.P} on {self.placement[i]}" for i in lost)
            raise StageLost(f"lost {names} during global step {t}")

    # -- stages -----------------------------------------------------------------------------

    def _create_stages(self, resume_from: Path | None) -> None:
        self.generation += 1
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        specs = [StageSpec(run_id=self.run_id, config=self.config, stage=i % self.P, replica=i // self.P,
                           bounds=self.layout.bounds, dataset=self.splits.train,
                           train_chunks=self.splits.train_chunks,
                           resume_from=str(resume_from) if resume_from else None,
                           threads=int(info[addr]["nthreads"]))
                 for i, addr in enumerate(self.placement)]
        self.futures = [self.client.submit(PipelineStage, spec, actor=True, workers=[addr], allow_other_workers=False,
                                           key=f"{self.run_id}-g{self.generation}-stage{spec.stage}-r{spec.replica}")
                        for spec, addr in zip(specs, self.placement)]
        self.actors = [f.result(timeout=STEP_TIMEOUT_S) for f in self.futures]
        P = self.P
        wiring = []
        for i, actor in enumerate(self.actors):
            r, s = divmod(i, P)
            prev = self.actors[i - 1] if s > 0 else None
            nxt = self.actors[i + 1] if s < P - 1 else None
            peers = [self.actors[q * P + s] for q in range(self.R)]
            wiring.append(actor.connect(prev, nxt, peers))
        for w in wiring:
            w.result(timeout=STEP_TIMEOUT_S)
        log.info("pipeline of %d stages x %d replicas on %s", P, self.R, self.placement)

    def _recover(self, exc: StageLost) -> int:
        """Re-create the stages from the newest checkpoint, the lost ones on other workers; returns the step to go on from."""
        self.recoveries += 1
        if self.recoveries > MAX_RECOVERIES:
            raise ClusterError(f"{exc}; gave up after {MAX_RECOVERIES} recoveries; {self._last_good()}") from None
        log.warning("%s: re-creating the pipeline from the newest checkpoint", exc)
        self._abort(str(exc))
        self._drop_stages()
        need = len(self.placement)
        deadline = time.monotonic() + WORKER_WAIT_S
        while True:
            alive = sorted(self.client.scheduler_info(n_workers=-1)["workers"])
            spare = [a for a in alive if a not in self.placement]
            lost = [i for i, a in enumerate(self.placement) if a not in alive]
            if len(spare) >= len(lost):
                break
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{exc}; no worker to re-create it on within {WORKER_WAIT_S:.0f} s: needs {need} workers, "
                    f"found {len(alive)}; {self._last_good()}"
                ) from None
            time.sleep(0.5)
        for i, addr in zip(lost, spare):
            self.placement[i] = addr
        ckpt = latest_checkpoint(self.run_dir)
        start = int(json.loads((ckpt / "state.json").read_text())["step"]) if ckpt else 0
        if ckpt is None and self.start_step:
            raise CheckpointError(f"{exc}; the checkpoint this run resumed from is gone")
        self._create_stages(ckpt)
        log.warning("pipeline re-created on %s; going on from global step %d", self.placement, start)
        return start

    def _abort(self, reason: str) -> None:
        calls = []
        for actor in self.actors:
            try:
                calls.append(actor.abort(reason))
            except Exception:  # its worker is gone
                pass
        for call in calls:
            try:
                call.result(timeout=5)
            except Exception:
                pass

    def _drop_stages(self) -> None:
        self.actors = []
        try:
            self.client.cancel(self.futures)
        except Exception as exc:  # the cluster may be gone already
            log.debug("could not release the stages of %s: %s", self.run_id, exc)
        self.futures = []

    def _weights(self) -> dict[str, Any]:
        """Replica 0's stages' weights, under the full model's keys (once, at the end)."""
        state: dict[str, Any] = {}
        for part in [a.state() for a in self.actors[: self.P]]:
            state.update(part.result(timeout=STEP_TIMEOUT_S))
        return state

    # -- checkpoints ------------------------------------------------------------------------

    def _checkpoint_after(self, t: int) -> bool:
        """Whether the weights after step ``t`` (``t + 1`` updates) are checkpointed."""
        done = t + 1
        every = self.config.checkpoint.every_steps
        return done % self.plan.steps_per_epoch == 0 or done == self.end_step or (every > 0 and done % every == 0)

    def _checkpoint_tmp(self, step: int) -> Path:
        tmp = self.run_dir / CHECKPOINTS / f".step-{step:08d}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def _commit_checkpoint(self, tmp: Path, step: int) -> None:
        """Add the manifest to the stages' parts and rename the directory into place."""
        epoch, k = self.plan.locate(step)
        manifest = {
            "step": step, "epoch": epoch, "step_in_epoch": k, "config_digest": self.config.digest(),
            "seed": self.config.train.seed, "config": self.config.model_dump(mode="json"),
            "stages": [list(b) for b in self.layout.bounds], DATA_LAYOUT: self.data_layout,
            "files": sorted(p.name for p in tmp.iterdir()),
        }
        with open(tmp / "state.json", "wb") as fh:  # last: its presence marks a complete checkpoint
            fh.write(json.dumps(manifest, indent=1).encode())
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        final = tmp.parent / f"step-{step:08d}"
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(tmp.parent)
        for old in list_checkpoints(self.run_dir)[: -self.config.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def _last_good(self) -> str:
        newest = latest_checkpoint(self.run_dir)
        return f"last good checkpoint: {newest}" if newest else "no checkpoint was written"

    # -- metrics ----------------------------------------------------------------------------

    def _step_record(self, t: int, stats: list[dict[str, Any]], step_time: float) -> dict[str, Any]:
        epoch, k = self.plan.locate(t)
        P, m = self.P, max(s["micro_batches"] for s in stats)
        lasts = [s for s in stats if s["stage"] == P - 1]
        count = sum(s["count"] for s in lasts)
        busy = [s["busy_s"] for s in stats]
        span = max(s["end"] for s in stats) - min(s["start"] for s in stats)
        return {
            "kind": "step", "global_step": t, "epoch": epoch, "step": k, "samples": count,
            "loss": sum(s["loss_sum"] for s in lasts) / count if count else float("nan"),
            "correct": sum(s["correct"] for s in lasts),
            "lr": lr_at(self.config, t, self.plan.steps_per_epoch),
            "step_time_s": step_time, "samples_per_s": count / step_time if step_time > 0 else 0.0,
            "data_wait_s": max(s["data_wait_s"] for s in stats), "compute_s": max(busy),
            # Per stage (replica 0 first): busy seconds and most activations held at once.
            "stage_busy_s": busy, "stage_max_alive": [s["max_alive"] for s in stats],
            # Busy time over (stages x the span from the first to the last F/B of the step):
            # the measured counterpart of the schedule's bound m / (m + P - 1).
            "pipeline_efficiency": sum(busy) / (len(stats) * span) if span > 0 else 0.0,
            "efficiency_bound": m / (m + P - 1), "recoveries": self.recoveries,
        }


def _epoch_record(epoch: int, end_step: int, steps: list[dict[str, Any]], loss: str) -> dict[str, Any]:
    count = sum(s["samples"] for s in steps)
    elapsed = sum(s["step_time_s"] for s in steps)
    record: dict[str, Any] = {
        "kind": "epoch", "epoch": epoch, "end_step": end_step, "samples": count,
        "train_loss": sum(s["loss"] * s["samples"] for s in steps) / count if count else None,
        "time_s": elapsed, "samples_per_s": count / elapsed if elapsed > 0 else 0.0,
        "pipeline_efficiency": sum(s["pipeline_efficiency"] for s in steps) / len(steps) if steps else 0.0,
    }
    if loss == "cross_entropy" and count:
        record["train_accuracy"] = sum(s["correct"] for s in steps) / count
    return record
