from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from tests.zoo.zoo_tiny import write_tiny_bert  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "bert")
