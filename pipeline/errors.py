"""The one exception hierarchy of dasktrain.

Every error a user can cause (a bad config, a bad store, a model that does not fit the data,
a diverging run, a cluster that cannot be had) is a :class:`DasktrainError` whose message names
what is wrong and where: the file, the field, the array, the chunk or the step. The CLI prints
the message alone, without a traceback, and exits non-zero.
"""

from __future__ import annotations


class DasktrainError(Exception):
    """Base class: a problem the user can fix, described in one message."""


class ConfigError(DasktrainError):
    """A config file or override is malformed: unknown key, wrong type, bad value."""


class DataError(DasktrainError):
    """A dataset store is missing, unreadable, or does not hold what the config says."""


class ShapeMismatchError(DataError):
    """The model cannot take the store's inputs, or its outputs do not fit the targets."""


class PlanError(DasktrainError):
    """The sampling plan cannot be built (e.g. fewer chunks than shards)."""


class NonFiniteLossError(DasktrainError):
    """A step produced a NaN or infinite loss or gradient; the update was not applied."""


class ClusterError(DasktrainError):
    """The Dask cluster cannot be started, reached, or does not fit the run (e.g. too many workers)."""


class CheckpointError(DasktrainError):
    """A checkpoint is missing, incomplete, or belongs to a different run configuration."""


class StorageError(ConfigError):
    """A path or URL names storage that cannot be opened: a protocol no installed fsspec
    filesystem handles (the message names the package to install), or options it refuses."""
