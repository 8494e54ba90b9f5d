"""Shared fixtures: random-weight checkpoints in the exact hub layout, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Two cores on CI: keep each test process on them without oversubscription.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint (converted layout, sharded) that loads in seconds on CPU."""
    from dsvl.tiny import write_checkpoint

    out = tmp_path_factory.mktemp("tiny-checkpoint")
    write_checkpoint(out, size="tiny", layout="converted", seed=0)
    return out


@pytest.fixture(scope="session")
def processor_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only the tokenizer/processor side of a checkpoint (no weights): for the text and processor tests."""
    from dsvl.processor import write_processor_files
    from dsvl.text import write_tiny_tokenizer

    out = tmp_path_factory.mktemp("processor-files")
    write_tiny_tokenizer(out)
    write_processor_files(out)
    return out
