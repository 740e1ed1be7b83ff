"""Embedding encoders (with their sentence-transformers modules) and T5 models live in the library like decoders."""

from __future__ import annotations

import json

import torch
from encoders_support import MINILM_TEXTS, make_t5_checkpoint, minilm_dir, reference_embeddings

from llmasos import pipeline


def test_an_imported_minilm_embeds_by_name_like_sentence_transformers(cli, home):
    result = cli("import", str(minilm_dir()), "--name", "minilm")
    assert result.exit_code == 0, result.output
    shown = json.loads(cli("show", "minilm", "--json").stdout)
    paths = {entry["path"] for entry in shown["files"]}
    assert {"modules.json", "1_Pooling/config.json", "model.safetensors"} <= paths
    assert shown["family"] == "bert" and shown["kv_cache_bytes_per_token"] is None  # an encoder keeps no KV cache
    embed = pipeline("embeddings", model="minilm")
    ours = torch.tensor(embed(MINILM_TEXTS))
    expected = reference_embeddings(minilm_dir(), MINILM_TEXTS)
    assert torch.nn.functional.cosine_similarity(ours, expected).min() > 0.9999


def test_an_imported_t5_translates_by_name(cli, home, workdir):
    make_t5_checkpoint(workdir / "t5")
    assert cli("import", str(workdir / "t5"), "--name", "t5-tiny").exit_code == 0
    by_name = pipeline("translation_en_to_de", model="t5-tiny")("a house")
    by_path = pipeline("translation_en_to_de", model=str(workdir / "t5"))("a house")
    assert by_name == by_path and "translation_text" in by_name[0]
