"""Hugging Face ``transformers`` models trained like any torch module.

A ``transformers.PreTrainedModel`` *is* an ``nn.Module``: a factory may build one from its config
(``GPT2LMHeadModel(GPT2Config(...))``, nothing downloaded) and its initial weights come from
torch's global generator, which :func:`dasktrain.models.build_model` seeds, so every process
builds the same model. Called with the batch's fields as keyword arguments (``data.fields``) it
returns its own loss (``loss: model``). Two things still need dasktrain's help, one function each:

- tied weights: GPT-2's output layer is its token embedding (``lm_head.weight`` and
  ``transformer.wte.weight`` name one ``nn.Parameter``). ``parameters()`` lists it once, so the
  flat gradient buffer and the optimizer hold it once, but ``state_dict()`` has both keys on one
  storage, which safetensors refuses to write (in checkpoints, ``model.safetensors`` and a
  replica's exported state alike): :func:`adapt` keeps one key per tensor, on save and on load;
- publishing: :func:`save_pretrained_dir` writes the model as Hugging Face's own directory
  (``config.json`` and ``model.safetensors``), which ``from_pretrained`` loads; the flow's
  publish stage does so for a finished run whose factory :func:`may_be_pretrained`.

Wiring (pipeline/models.py only; the replicas, checkpoints and ``evaluate``/``predict`` all build
models through ``build_model``)::

    from dasktrain import hf_support

    def build_model(config: ModelConfig, seed: int) -> nn.Module:
        ...
        model = keras_support.adapt(model, config.factory)
        model = hf_support.adapt(model)                      # before the nn.Module check
        if not isinstance(model, nn.Module):
            ...

``transformers`` is an optional extra (``pip install -e ".[huggingface]"``) and is never imported
here: a model is recognised as a ``PreTrainedModel`` only when the process has already imported
``transformers`` (as the factory's module does), and for any other model every function here
changes nothing.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from torch import nn

log = logging.getLogger(__name__)

PRETRAINED_DIR = "hf"
"""The directory of a run (beside ``model.safetensors``) that the publish stage writes."""
_ADAPTED = "_dasktrain_adapted"
"""Attribute marking a model :func:`adapt` has hooked: a second call changes nothing."""


def is_pretrained_model(model: object) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel``, without importing transformers."""
    # Where the class is defined: loaded with any model class, and no lazy import is triggered.
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


def adapt(model: Any) -> Any:
    """``model`` ready for dasktrain when it is a ``PreTrainedModel``; anything else is returned as is.

    Registers hooks on the model: ``state_dict`` keeps one key per tensor (the name
    ``named_parameters()`` gives it, the first registered: ``transformer.wte.weight``, not
    ``lm_head.weight``, the key Hugging Face's own files leave out too), and ``load_state_dict``
    accepts such a dict. Loading copies into the one parameter, so the weights stay tied.
    """
    if not is_pretrained_model(model) or getattr(model, _ADAPTED, False):
        return model
    setattr(model, _ADAPTED, True)
    model.register_state_dict_post_hook(_drop_aliases)
    model.register_load_state_dict_post_hook(_allow_aliases)
    return model


def aliases(module: nn.Module, prefix: str = "") -> list[str]:
    """State-dict keys of ``module`` naming a tensor that an earlier key (in registration order,
    as ``named_parameters()`` walks the module) also names: the keys a saved state leaves out."""
    first: set[int] = set()
    dropped = []
    for name, tensor in [*module.named_parameters(remove_duplicate=False),
                         *module.named_buffers(remove_duplicate=False)]:
        if id(tensor) in first:
            dropped.append(prefix + name)
        first.add(id(tensor))
    return dropped


def _drop_aliases(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in aliases(module, prefix):
        state.pop(key, None)


def _allow_aliases(module: nn.Module, incompatible: Any) -> None:
    dropped = aliases(module)
    # The hook sees the keys of the whole load: a model nested in another has its keys prefixed.
    incompatible.missing_keys[:] = [key for key in incompatible.missing_keys
                                    if not any(key == alias or key.endswith("." + alias) for alias in dropped)]


def may_be_pretrained(factory: str) -> bool:
    """Whether the model of ``factory`` (``module:callable``) may be a ``PreTrainedModel``: its
    module, imported here (the run imported it already, so this is a look-up), left ``transformers``
    imported in this process. False means it is not one, with no model built; True is only a "maybe"
    (another module may have imported transformers), which :func:`save_pretrained_dir` settles.
    A factory importing ``transformers`` inside its body only is not recognised."""
    importlib.import_module(factory.partition(":")[0])
    return "transformers.modeling_utils" in sys.modules


def save_pretrained_dir(model: Any, path: str | Path) -> Path | None:
    """Write a ``PreTrainedModel`` as the directory ``path`` holding ``config.json`` and
    ``model.safetensors``, for ``ModelClass.from_pretrained(path)``; returns ``path``, or ``None``
    (and writes nothing) for any other model. Tied weights are written once, under the key Hugging
    Face's files use; ``from_pretrained`` ties them again.

    The directory is written beside, under a temporary name, then renamed into place, replacing
    one that was there: a directory under the final name is always whole and of one model."""
    if not is_pretrained_model(model):
        return None
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    options: dict[str, Any] = {}
    # transformers 4 would write a pickle when told safe_serialization=False; 5 writes safetensors only.
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        options["safe_serialization"] = True
    from transformers.utils import logging as hf_logging  # imported already: the model is one of its classes

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Writing model shards" bar: the CLI owns the terminal
    try:
        model.save_pretrained(str(tmp), **options)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if path.exists():
        shutil.rmtree(path)
    os.rename(tmp, path)
    log.info("wrote the model as a Hugging Face directory: %s", path)
    return path
