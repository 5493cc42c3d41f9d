"""Keras 3 models (torch backend) trained like any torch module.

With ``KERAS_BACKEND=torch`` a ``keras.Model`` *is* an ``nn.Module``: its ``parameters()`` are the
keras variables' own ``nn.Parameter`` objects, so gradients bound as views, ``torch.optim``
updates and ``load_state_dict`` all reach the keras model, and ``model(tensor)`` returns a torch
tensor. Four things still need dasktrain's help, one function each below:

- the backend is read once, when ``keras`` is first imported, and every worker process imports
  the user's factory module afresh: :func:`default_backend` sets ``KERAS_BACKEND=torch`` in the
  process (unless the user chose one) before the factory module is imported;
- keras draws the seeds of unseeded initializers from Python's ``random`` (which other threads
  of a Dask worker use too), and names layers from a per-process counter (``dense``,
  ``dense_1``, ...) that appears in the parameter names, which ``nn.ParameterDict`` sorts:
  :func:`seeded` resets keras's session and seeds it, so that every process gets the same
  weights, the same names and the same parameter order for a seed;
- a ``Sequential`` holds its variables twice (itself and its inner functional model), so its
  ``state_dict`` has two keys per tensor, which safetensors refuses to write: :func:`adapt`
  keeps one key per tensor, on save and on load;
- keras layers ignore torch's ``train()``/``eval()`` (a call is in inference mode unless it is
  passed ``training=True``): :func:`adapt` passes the module's mode to every call.

Wiring (pipeline/models.py only; the replicas, checkpoints and ``evaluate``/``predict`` all build
models through ``build_model``)::

    from dasktrain import keras_support

    def build_model(config: ModelConfig, seed: int) -> nn.Module:
        keras_support.default_backend()          # before resolve_factory imports the user's module
        factory = resolve_factory(config.factory)
        with torch.random.fork_rng(devices=[]), keras_support.seeded(seed):
            torch.manual_seed(seed)
            ...                                  # the factory call, unchanged
        model = keras_support.adapt(model, config.factory)   # before the nn.Module check
        if not isinstance(model, nn.Module):
            ...

For a factory that does not build a Keras model all three change nothing, except that
``seeded`` seeds Python's and NumPy's global random state for the factory call (then restores
it), and ``default_backend`` sets ``KERAS_BACKEND`` in the process when it is unset.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch import nn

from dasktrain.errors import ConfigError

BACKEND_VARIABLE = "KERAS_BACKEND"


def default_backend() -> None:
    """Make ``torch`` the Keras backend of this process when keras is not imported yet and the
    user set no ``KERAS_BACKEND``. Call it before importing a user's factory module."""
    if "keras" not in sys.modules:
        os.environ.setdefault(BACKEND_VARIABLE, "torch")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Around a factory call: keras's initial weights, layer names and parameter order come
    from ``seed`` alone, whatever this process built before and whatever its other threads do.

    When keras is imported, its session is cleared (layer-name counters restart at ``dense``)
    and :func:`keras.utils.set_random_seed` is called. Keras's unseeded initializers draw their
    seeds from the ``random`` module, which a Dask worker's event loop also draws from while
    the factory runs (Dask samples collections to size them): for the factory call, keras draws
    them from a generator of its own, seeded with ``seed``. Python's and NumPy's global random
    state are seeded too (a factory importing keras itself, or using them, draws from them) and
    restored afterwards. Clearing the session resets keras's global settings, e.g. a dtype
    policy: set those inside the factory.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    keras = sys.modules.get("keras")
    # The module keras's make_default_seed() calls ``python_random.randint`` on (keras 3.0-3.15).
    seeds = sys.modules.get("keras.src.random.seed_generator")
    private = seeds is not None and getattr(seeds, "python_random", None) is random
    try:
        if keras is not None:
            keras.backend.clear_session(free_memory=False)
            keras.utils.set_random_seed(seed)
        if private:
            seeds.python_random = random.Random(seed)  # type: ignore[union-attr]
        yield
    finally:
        if private:
            seeds.python_random = random  # type: ignore[union-attr]
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def is_keras_model(model: object) -> bool:
    """Whether ``model`` is a Keras layer or model (of any backend), without importing keras."""
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(model, keras.layers.Layer)


def adapt(model: Any, factory: str) -> Any:
    """``model`` ready for dasktrain when it is a Keras model; anything else is returned as is.

    Refuses, naming ``factory``, a Keras model of another backend than torch and one not built
    (no ``keras.Input`` and no ``build()``: it has no weights until its first call, too late for
    the optimizer). Registers hooks on the model: ``state_dict`` keeps one key per tensor (the
    shortest of its names), ``load_state_dict`` accepts such a dict, and each call passes
    ``training=`` the module's ``train()``/``eval()`` mode.
    """
    if not is_keras_model(model):
        return model
    keras = sys.modules["keras"]
    backend = keras.backend.backend()
    if backend != "torch" or not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory {factory} returned a Keras model of the {backend!r} backend; dasktrain "
                          f"trains Keras models on the torch backend: set {BACKEND_VARIABLE}=torch before keras is "
                          "imported (in the driver and the workers), or leave it unset")
    if not model.built or not model.weights:
        raise ConfigError(f"model.factory {factory} returned a Keras model that is not built (it has no weights "
                          "yet): start it with keras.Input(shape=...) or call model.build((None, ...)) in the factory")
    model.register_state_dict_post_hook(_drop_aliases)
    model.register_load_state_dict_post_hook(_allow_aliases)
    model.register_forward_pre_hook(_pass_training_mode, with_kwargs=True)
    return model


def aliases(module: nn.Module, prefix: str = "") -> list[str]:
    """State-dict keys of ``module`` naming a tensor that a shorter key (or, at equal length, an
    earlier one in sorted order) also names: the keys a saved state leaves out."""
    names: dict[int, list[str]] = {}
    for name, tensor in [*module.named_parameters(remove_duplicate=False),
                         *module.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(tensor), []).append(prefix + name)
    dropped = []
    for group in names.values():
        dropped += sorted(group, key=lambda key: (len(key), key))[1:]
    return dropped


def _drop_aliases(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in aliases(module, prefix):
        state.pop(key, None)


def _allow_aliases(module: nn.Module, incompatible: Any) -> None:
    dropped = set(aliases(module))
    # The hook sees the keys of the whole load; a nested keras model's keys carry its prefix.
    incompatible.missing_keys[:] = [key for key in incompatible.missing_keys
                                    if not any(key.endswith(alias) for alias in dropped)]


def _pass_training_mode(module: nn.Module, args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    kwargs.setdefault("training", module.training)
    return args, kwargs
