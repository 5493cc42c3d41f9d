"""Engines: what differs between kinds of parallelism, behind :class:`~dasktrain.engines.base.Engine`.

- :mod:`~dasktrain.engines.tree`: data parallelism, gradients summed by a tree of Dask tasks;
- :mod:`~dasktrain.engines.collective`: data parallelism, an all-reduce in many-step tasks;
- :mod:`~dasktrain.engines.pipeline`: stages as Dask actors (pipeline and DP x PP).

A new reduction mode is one module here, a line in :func:`make_engine` and a config literal.
"""

from __future__ import annotations

from dasktrain.engines.base import Engine, RunContext
from dasktrain.engines.collective import CollectiveEngine
from dasktrain.engines.pipeline import PipelineEngine
from dasktrain.engines.tree import TreeEngine
from dasktrain.stages import StageLayout


def make_engine(ctx: RunContext, stages: StageLayout | None = None) -> Engine:
    """The engine the config asks for, on the context's cluster; ``stages``: where the model is
    cut, for pipeline parallelism (planned on the driver before the cluster started)."""
    if stages is not None:
        return PipelineEngine(ctx, stages)
    if ctx.config.train.reduce == "collective":
        return CollectiveEngine(ctx)
    return TreeEngine(ctx)
