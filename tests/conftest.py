"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from dasktrain.ingest import example_arrays, write_store


@pytest.fixture(scope="session")
def digits_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits example (1797 samples, flat inputs) as a store of 64-sample chunks (29 chunks).

    Shared by the whole session: tests must only read it.
    """
    path = tmp_path_factory.mktemp("data") / "digits.zarr"
    return write_store(path, example_arrays("digits"), chunk_size=64, source="example:digits")
