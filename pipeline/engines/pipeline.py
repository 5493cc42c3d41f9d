"""``parallel.pipeline > 1``: the model cut into stages, each a Dask actor pinned to a worker.

R x P stage actors (replica ``r``'s stage ``s`` on worker ``r * P + s``) are wired to their
neighbours and to the same stage of the other replicas. Each step the engine calls
``run_step(t)`` on every stage; activations, their gradients and the replicas' gradient sums
move between the actors (:mod:`dasktrain.stage_actor`), so the run loop sends step numbers and
receives numbers.

Checkpoints: at a checkpoint boundary, replica 0's stages write their parts into a directory
from :func:`dasktrain.checkpoint.begin_checkpoint`; once the step's results are in, the engine
adds ``state.json`` (step, config digest, the stage bounds, the parts) and commits it with
:func:`dasktrain.checkpoint.commit_checkpoint`, which also prunes: the same atomic path as data
parallelism.

A lost or frozen stage: actors are not resilient in Dask, so every stage is re-created from the
newest checkpoint (the lost ones on spare workers, the rest where they were) and the run goes on
from that step: the same trajectory as an uninterrupted run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dasktrain.checkpoint import (
    begin_checkpoint,
    checkpoint_state,
    checkpoint_step,
    commit_checkpoint,
    latest_checkpoint,
)
from dasktrain.engines.base import (
    Engine,
    Outcome,
    RunContext,
    StepResult,
    StepSink,
    WorkersChanged,
    silent_workers,
    write_manifest,
)
from dasktrain.errors import CheckpointError, ClusterError, DasktrainError
from dasktrain.reduce import StepStats
from dasktrain.schedules import Costs, efficiency_bound
from dasktrain.stage_actor import PipelineStage, StageAborted, StageSpec
from dasktrain.stages import StageLayout
from dasktrain.storage import AnyPath, remove_tree

log = logging.getLogger(__name__)


STEP_STATS = tuple(f.name for f in dataclasses.fields(StepStats))


@dataclass
class _Step:
    step: int
    calls: list[Any]
    """One ``run_step`` call per stage, index ``r * P + s``."""
    save_to: AnyPath | None
    validate: bool


class PipelineEngine(Engine):
    """Pipeline (and DP x PP) parallelism with stage actors."""

    POLL_S = 1.0
    """How often a waiting engine checks that the stages' workers are alive."""
    SILENT_S = 5.0
    """Heartbeat silence that marks a stage's worker as frozen once a step passed ``train.step_timeout``."""
    MAX_RECOVERIES = 5
    SETUP_S = 300.0

    def __init__(self, ctx: RunContext, layout: StageLayout) -> None:
        super().__init__(ctx)
        config = ctx.config
        if ctx.cadence.start:  # a resumed run keeps the cuts it was checkpointed with
            layout = _layout_of(latest_checkpoint(ctx.run_dir), layout)
        self.layout = layout
        self.P = config.parallel.pipeline
        """Ranks (stage actors) per replica; ``layout`` cuts the model into ``P * virtual`` stages."""
        self.virtual = layout.stages // self.P
        self.R = config.parallel.data
        workers = sorted(self.client.scheduler_info(n_workers=-1)["workers"])
        need = self.R * self.P
        if len(workers) < need:
            raise ClusterError(
                f"parallel.pipeline={self.P} stages x parallel.data={self.R} replicas needs {need} workers "
                f"(one per stage), found {len(workers)}; add workers or lower parallel.pipeline/parallel.data"
            )
        self.placement = workers[:need]
        """Worker of each stage, index ``r * P + s``."""
        self.excluded: set[str] = set()
        self.actors: list[Any] = []
        self.futures: list[Any] = []
        self.generation = 0
        self.recoveries = 0

    @property
    def workers(self) -> tuple[str, ...]:
        return tuple(self.placement)

    def start_info(self) -> dict[str, Any]:
        return {"stages": [list(b) for b in self.layout.bounds], "dashboard": None}

    def start(self, step: int) -> None:
        self._create_stages(latest_checkpoint(self.ctx.run_dir) if step else None)

    # -- steps ------------------------------------------------------------------------------

    def ready(self, pending: Sequence[_Step]) -> bool:
        # A stage runs its steps in step order whatever order the calls arrive in.
        return len(pending) <= self.config.train.ahead

    def submit(self, t: int) -> tuple[_Step, int | None]:
        cadence = self.ctx.cadence
        save_to = begin_checkpoint(self.ctx.run_dir, t + 1) if cadence.checkpoint(t + 1) else None
        validate = cadence.epoch_end(t + 1)
        try:
            # Replica 0's stages write the checkpoint parts.
            calls = [a.run_step(t, str(save_to) if save_to is not None and i < self.P else None, validate)
                     for i, a in enumerate(self.actors)]
        except Exception as exc:  # Dask refuses calls on an actor whose worker it knows is gone
            self._check_alive(t)
            raise ClusterError(f"global step {t} could not start: {exc}") from None
        return _Step(t, calls, save_to, validate), (t + 1 if t + 1 < cadence.end else None)

    def wait(self, handle: _Step) -> Outcome:
        try:
            stats = self._results(handle)
        except BaseException:
            if handle.save_to is not None:
                remove_tree(handle.save_to)
            raise
        t = handle.step
        if handle.save_to is not None:
            manifest = {**self.ctx.checkpoint_meta(t + 1), "stages": [list(b) for b in self.layout.bounds],
                        "files": sorted(p.name for p in handle.save_to.iterdir())}
            write_manifest(handle.save_to, manifest)
            commit_checkpoint(self.ctx.run_dir, handle.save_to, t + 1, self.config.checkpoint.keep)
        # Losses and counts come from the last stages, reads from the ends, times from every
        # stage: StepStats adds the stages' numbers as it adds workers' (times: the slowest).
        totals = functools.reduce(operator.add, (StepStats(**{k: s[k] for k in STEP_STATS}) for s in stats)).as_dict()
        busy = [s["busy_s"] for s in stats]
        span = max(s["end"] for s in stats) - min(s["start"] for s in stats)
        m = max(s["micro_batches"] for s in stats)
        bound = self._bound(stats, m)
        result = StepResult(t, totals, extra={
            # Per stage (replica 0 first): busy seconds and most activations held at once.
            "stage_busy_s": busy, "stage_max_alive": [s["max_alive"] for s in stats],
            # Busy time over (stages x the span from the first to the last action of the step):
            # the measured counterpart of the schedule's bound (1F1B: m / (m + P - 1)).
            "pipeline_efficiency": sum(busy) / (len(stats) * span) if span > 0 else 0.0,
            "efficiency_bound": bound, "recoveries": self.recoveries})
        if not handle.validate:
            return Outcome([result])
        return Outcome([result], validated=t + 1, validation=totals)

    def _bound(self, stats: list[dict[str, Any]], m: int) -> float:
        """The schedule's efficiency bound with this step's measured costs of F, B and W on each
        stage (replica 0's; a worker's chunks alike): what the step would reach with free,
        instant transfers. The first stage's B is nearly free (no input gradient to take)."""
        par = self.config.parallel
        units = m * self.virtual
        per_rank = [Costs(*(s["op_s"][k] / units for k in "FBW")) for s in stats[: self.P]]
        if not all(c.f + c.b + c.w > 0 for c in per_rank):
            return efficiency_bound(par.schedule, self.P, m, self.virtual)
        per_stage = [per_rank[vs % self.P] for vs in range(self.P * self.virtual)]
        return efficiency_bound(par.schedule, self.P, m, self.virtual, per_stage)

    def _results(self, handle: _Step) -> list[dict[str, Any]]:
        """Every stage's stats of the step; raises :class:`WorkersChanged` when a stage's worker
        died or, past ``train.step_timeout``, stopped sending heartbeats."""
        t = handle.step
        timeout = self.config.train.step_timeout
        began = time.monotonic()
        results: list[dict[str, Any] | None] = [None] * len(handle.calls)
        try:
            for i, call in enumerate(handle.calls):
                while results[i] is None:
                    try:
                        results[i] = call.result(timeout=self.POLL_S)
                    except (TimeoutError, concurrent.futures.TimeoutError):
                        # Only a slow step pays for this look at the scheduler.
                        self._check_alive(t)
                        if timeout is not None and time.monotonic() - began > timeout:
                            self._past_deadline(t, timeout, began)
        except WorkersChanged:
            raise
        except (StageAborted, OSError, ClusterError) as exc:
            # A neighbour's worker died or froze: the others see an aborted step, a closed
            # connection, or a wait for its tensors that ran out.
            self._check_alive(t)
            self._check_frozen(t, exc)
            self._abort(f"stage failed at step {t}")
            raise ClusterError(f"global step {t} failed: {exc}") from None
        except DasktrainError:
            self._abort(f"stage failed at step {t}")
            raise
        except Exception as exc:  # a lost actor can surface as any comm error; find out which
            self._check_alive(t)
            raise ClusterError(f"global step {t} failed: {type(exc).__name__}: {exc}") from None
        return results  # type: ignore[return-value]

    def _past_deadline(self, t: int, timeout: float, began: float) -> None:
        """A step past ``train.step_timeout``: drop the stage workers that went silent; if none
        did within SILENT_S more, the step is stuck for a reason no regroup fixes."""
        silent = silent_workers(self.client, self.placement, self.SILENT_S)
        if silent:
            raise WorkersChanged(f"global step {t} passed train.step_timeout={timeout}s and workers {silent} "
                                 f"sent no heartbeat for {self.SILENT_S:.0f} s", exclude=tuple(silent))
        if time.monotonic() - began > timeout + self.SILENT_S:
            self._abort(f"step {t} passed train.step_timeout")
            raise ClusterError(f"global step {t} passed train.step_timeout={timeout}s with every stage's worker "
                               "alive and answering")

    def _check_frozen(self, t: int, exc: BaseException) -> None:
        """With ``train.step_timeout`` set: raise :class:`WorkersChanged` for the stage workers
        that stopped sending heartbeats (looked for during SILENT_S: one frozen a moment ago
        shows by then), so the run goes on without them."""
        timeout = self.config.train.step_timeout
        if timeout is None:
            return
        until = time.monotonic() + self.SILENT_S + 1.0
        while True:
            silent = silent_workers(self.client, self.placement, self.SILENT_S)
            if silent:
                raise WorkersChanged(f"global step {t} failed as workers {silent} froze (no heartbeat for "
                                     f"{self.SILENT_S:.0f} s, train.step_timeout={timeout}s): {exc}", exclude=tuple(silent))
            if time.monotonic() > until:
                return
            time.sleep(self.POLL_S / 2)

    def _check_alive(self, t: int) -> None:
        alive = set(self.client.scheduler_info(n_workers=-1)["workers"])
        lost = [i for i, addr in enumerate(self.placement) if addr not in alive]
        if lost:
            names = ", ".join(f"stage {i % self.P} of replica {i // self.P} on {self.placement[i]}" for i in lost)
            raise WorkersChanged(f"lost {names} during global step {t}")

    def poll(self) -> None:
        """Joined workers wait as spares: a pipeline's shape does not change while it trains."""

    def cancel(self, pending: Sequence[_Step]) -> None:
        for handle in pending:
            if handle.save_to is not None:
                remove_tree(handle.save_to)

    # -- stages -----------------------------------------------------------------------------

    def _create_stages(self, resume_from: AnyPath | None) -> None:
        ctx = self.ctx
        self.generation += 1
        start = checkpoint_step(resume_from) if resume_from is not None else 0
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        n = self.R
        specs = [StageSpec(run_id=ctx.run_id, config=self.config, stage=i % self.P, replica=i // self.P,
                           bounds=self.layout.bounds, dataset=ctx.splits.train, train_chunks=ctx.splits.train_chunks,
                           resume_from=str(resume_from) if resume_from else None, threads=int(info[addr]["nthreads"]),
                           val_dataset=ctx.splits.val, val_chunks=tuple(ctx.splits.val_chunks[i // self.P::n]),
                           step_timeout_s=self.config.train.step_timeout, start_step=start)
                 for i, addr in enumerate(self.placement)]
        self.futures = [self.client.submit(PipelineStage, spec, actor=True, workers=[addr], allow_other_workers=False,
                                           key=f"{ctx.run_id}-g{self.generation}-stage{spec.stage}-r{spec.replica}")
                        for spec, addr in zip(specs, self.placement)]
        self.actors = [f.result(timeout=self.SETUP_S) for f in self.futures]
        P = self.P
        wiring = []
        for i, actor in enumerate(self.actors):
            r, s = divmod(i, P)
            # With virtual stages activations go round the ranks: the last rank feeds the first.
            ring = self.virtual > 1
            prev = self.actors[r * P + (s - 1) % P] if s > 0 or ring else None
            nxt = self.actors[r * P + (s + 1) % P] if s < P - 1 or ring else None
            peers = [self.actors[q * P + s] for q in range(self.R)]
            wiring.append(actor.connect(prev, nxt, peers))
        for w in wiring:
            w.result(timeout=self.SETUP_S)
        log.info("pipeline of %d stages x %d replicas on %s", P, self.R, self.placement)

    def recover(self, change: WorkersChanged, sink: StepSink) -> tuple[int, dict[str, Any]]:
        """Re-create the stages from the newest checkpoint, the lost ones on spare workers."""
        self.recoveries += 1
        if self.recoveries > self.MAX_RECOVERIES:
            raise ClusterError(f"{change}; gave up after {self.MAX_RECOVERIES} recoveries") from None
        self.excluded.update(change.exclude)
        log.warning("%s: re-creating the pipeline from the newest checkpoint", change)
        self._abort(str(change))
        self.close()
        old = list(self.placement)
        grace = self.config.train.worker_grace_s
        deadline = time.monotonic() + grace
        while True:
            alive = sorted(set(self.client.scheduler_info(n_workers=-1)["workers"]) - self.excluded)
            spare = [a for a in alive if a not in self.placement]
            lost = [i for i, a in enumerate(self.placement) if a not in alive]
            if len(spare) >= len(lost):
                break
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{change}; no worker to re-create the stage on within train.worker_grace_s={grace:.0f}s: "
                    f"needs {len(self.placement)} workers, found {len(alive)}"
                ) from None
            time.sleep(0.5)
        for i, addr in zip(lost, spare):
            self.placement[i] = addr
        ckpt = latest_checkpoint(self.ctx.run_dir)
        if ckpt is None and self.ctx.cadence.start:
            raise CheckpointError(f"{change}; the checkpoint this run resumed from is gone")
        step = checkpoint_step(ckpt) if ckpt else 0
        self._create_stages(ckpt)
        log.warning("pipeline re-created on %s; going on from global step %d", self.placement, step)
        event = {"kind": "regroup", "reason": str(change), "global_step": step, "generation": self.generation,
                 "lost": sorted(set(old) - set(self.placement)), "joined": sorted(set(self.placement) - set(old)),
                 "workers": len(self.placement), "end_step": step}
        return step, event

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

    def final_weights(self) -> dict[str, Any]:
        """Replica 0's stages' weights, under the full model's keys (once, at the end)."""
        state: dict[str, Any] = {}
        for part in [a.state() for a in self.actors[: self.P]]:
            state.update(part.result(timeout=self.SETUP_S))
        return state

    def close(self) -> None:
        self.actors = []
        try:
            self.client.cancel(self.futures)
        except Exception as exc:  # the cluster may be gone already
            log.debug("could not release the stages of %s: %s", self.ctx.run_id, exc)
        self.futures = []


def _layout_of(ckpt: AnyPath | None, layout: StageLayout) -> StageLayout:
    """The cuts a checkpoint was written with (time balancing may measure others now)."""
    if ckpt is None:
        return layout
    manifest = checkpoint_state(ckpt)
    if "stages" not in manifest:
        raise CheckpointError(f"checkpoint {ckpt} was not written by a pipeline-parallel run")
    bounds = tuple((int(lo), int(hi)) for lo, hi in manifest["stages"])
    return StageLayout(bounds, layout.layers, layout.named)
