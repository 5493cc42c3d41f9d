"""A user's Keras 3 model: a factory module as a user writes it, with nothing of dasktrain in it.

It imports keras at the top, like any user module: the backend must already be torch when
dasktrain imports it, in the driver and in every worker, which is dasktrain's job.
"""

from __future__ import annotations

import keras


def mlp(in_features: int, hidden: int, out_features: int) -> keras.Model:
    """Dense (relu), Dense: logits for ``out_features`` classes of flat inputs."""
    return keras.Sequential([
        keras.Input(shape=(in_features,)),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(out_features),
    ])


def unbuilt_mlp(in_features: int, hidden: int, out_features: int) -> keras.Model:
    """The same layers without an input shape: no weights until the first call."""
    return keras.Sequential([keras.layers.Dense(hidden, activation="relu"), keras.layers.Dense(out_features)])


def dropout_mlp(in_features: int, hidden: int, out_features: int, rate: float = 0.5) -> keras.Model:
    """``mlp`` with Dropout after the hidden layer: its output depends on train() / eval()."""
    return keras.Sequential([
        keras.Input(shape=(in_features,)),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dropout(rate),
        keras.layers.Dense(out_features),
    ])
