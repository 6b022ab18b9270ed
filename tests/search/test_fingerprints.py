"""Workers check every model against the driver's sha256 before merging (no Ray needed for the check)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mergelab.distributed import check_address, check_fingerprints, fingerprint, fingerprints
from mergelab.errors import MergelabError


def test_a_changed_or_missing_model_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "expert.safetensors"
    model.write_bytes(b"weights")
    assert fingerprint(model) == hashlib.sha256(b"weights").hexdigest()
    expected = fingerprints([model, {"a state dict": "shipped by value"}])
    assert list(expected) == [str(model)]
    check_fingerprints(expected)  # the same file: accepted
    model.write_bytes(b"other weights!")
    with pytest.raises(MergelabError, match="differs from the driver's copy"):
        check_fingerprints(expected)
    model.unlink()
    with pytest.raises(MergelabError, match="shared by every node"):
        check_fingerprints(expected)


def test_folder_fingerprint_joins_its_weight_files(tmp_path: Path) -> None:
    (tmp_path / "b.safetensors").write_bytes(b"b")
    (tmp_path / "a.safetensors").write_bytes(b"a")
    (tmp_path / "config.json").write_text("{}")
    parts = hashlib.sha256(b"a").hexdigest() + hashlib.sha256(b"b").hexdigest()
    assert fingerprint(tmp_path) == hashlib.sha256(parts.encode()).hexdigest()


@pytest.mark.parametrize("address", ["", "local:0", "local:two"])
def test_bad_addresses(address: str) -> None:
    with pytest.raises(MergelabError, match="--ray"):
        check_address(address)
