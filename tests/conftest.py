"""Shared test fixtures. Tests run on the CPU with few threads (CI has 2 cores)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real AudioSet metadata lives outside the project (../shared/audioset_meta); absent on a
# user's fresh clone, so tests that read it skip.
SHARED_META = Path(os.environ.get("AUDIOSET_META_DIR", REPO_ROOT.parent / "shared" / "audioset_meta"))


@pytest.fixture(scope="session")
def audioset_meta() -> Path:
    if not (SHARED_META / "class_labels_indices.csv").is_file():
        pytest.skip(f"real AudioSet metadata not found at {SHARED_META}")
    return SHARED_META


@pytest.fixture(scope="session", autouse=True)
def no_weight_downloads(tmp_path_factory):
    """No test downloads published weights or touches the user's model cache: an empty cache of
    the session's own, downloads off. Tests that fetch serve the files themselves (loopback
    server, tests/test_pretrained.py) and turn downloads back on for that."""
    patch = pytest.MonkeyPatch()
    patch.setenv("AUDIOSET_DCLS_CACHE", str(tmp_path_factory.mktemp("weights_cache")))
    patch.setenv("AUDIOSET_DCLS_OFFLINE", "1")
    patch.delenv("AUDIOSET_DCLS_WEIGHTS_URL", raising=False)
    yield
    patch.undo()


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> Path:
    """The session's tiny model trained on the synthetic classes (tests/train_shards.py): its run
    directory, holding ``model.safetensors``."""
    from train_shards import train_tiny_run

    return train_tiny_run(tmp_path_factory)[0]
