"""The quality section of a job, the rephrase operator's parsing, PVI and embedding
near-duplicates: pure code, no Ray and no engine."""

from __future__ import annotations

import numpy as np
import pytest

from raydag.chain import run_signature
from raydag.config import load_job
from raydag.embed import embedding_near_duplicates, max_similarity
from raydag.engines.base import Completion
from raydag.errors import ConfigError
from raydag.ops.reform import RephraseOp
from raydag.train import pointwise_v_information

from conftest import QUICKSTART, ROOT


def test_quality_defaults_and_eval_paths_resolve_against_the_yaml(tmp_path):
    job = load_job(ROOT / "jobs" / "sst2_quality.yaml")
    assert job.quality.decontam.ngram == 13 and job.quality.near_dup.threshold == 0.8
    assert job.quality.decontam.eval_paths["dev"] == str((ROOT.parent / "shared" / "data" / "sst2" / "dev.jsonl").resolve())
    assert load_job(QUICKSTART).quality.coannotation.enabled is False


def test_coannotation_thresholds_must_be_ordered():
    with pytest.raises(ConfigError, match="accept_below must not exceed drop_above"):
        load_job(QUICKSTART, ["quality.coannotation.accept_below=0.9",
                              "quality.coannotation.drop_above=0.5"])
    with pytest.raises(ConfigError, match="quality.near_dup.threshold"):
        load_job(QUICKSTART, ["quality.near_dup.threshold=1.5"])


def test_pvi_needs_the_raw_student():
    with pytest.raises(ConfigError, match="add 'raw' to student.train_sets"):
        load_job(QUICKSTART, ["quality.consistency.pvi_threshold=0.0", "student.train_sets=[mixed]"])
    assert load_job(QUICKSTART, ["quality.consistency.pvi_threshold=0.0"]).quality.consistency.pvi_threshold == 0.0


def test_only_pii_settings_change_the_run_signature():
    base = run_signature(load_job(QUICKSTART), {})[0]
    passes = run_signature(load_job(QUICKSTART, [
        "quality.near_dup.threshold=0.6", "quality.decontam.ngram=8",
        "quality.coannotation.enabled=true", "quality.bias.z_min=2"]), {})[0]
    pii = run_signature(load_job(QUICKSTART, ["quality.pii.types=[email]"]), {})[0]
    assert passes == base  # finished shards are reused when only the passes change
    assert pii != base  # redaction happens as shards are written


def rephrase(text: str, words=("delightful",)) -> list[dict]:
    row = {"id": "r1", "text": "A delightful film, simply delightful.", "label": "positive",
           "shortcut_words": list(words)}
    return RephraseOp(labels=["negative", "positive"]).parse(row, [Completion(text, 20, 6, "stop")])


def test_rephrase_replaces_the_row_only_when_the_words_are_gone():
    original, new = rephrase("A charming film, simply lovely.")
    assert original["_reason"] == "rephrased" and new["text"] == "A charming film, simply lovely."
    assert new["parent_ids"] == ["r1"] and new["label"] == "positive"
    original, new = rephrase("A Delightful film indeed.")  # the word is still there
    assert original == {} and new["_reason"] == "rephrase_kept_shortcut"
    original, new = rephrase("")  # an empty rewrite: the original stays
    assert original == {} and new["_status"] == "quarantined"


def test_rephrase_request_names_the_words_to_avoid():
    request = RephraseOp().build_requests({"id": "r1", "text": "so delightful", "label": "positive",
                                           "shortcut_words": ["delightful", "gem"]})[0]
    assert '"delightful", "gem"' in request.messages[-1]["content"]
    assert request.seed == RephraseOp().build_requests({"id": "r1", "text": "x", "label": "positive",
                                                        "shortcut_words": ["gem"]})[0].seed


def test_pvi_is_bits_over_the_label_prior():
    pvi = pointwise_v_information(np.log2([0.5, 0.25, 0.9]), ["a", "b", "b"], {"a": 0.5, "b": 0.25})
    assert pvi.tolist() == pytest.approx([0.0, 0.0, np.log2(0.9 / 0.25)])


def test_embedding_near_duplicates_keep_the_earliest_and_match_references():
    vectors = np.array([[1, 0, 0], [0.99, 0.14, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    reference = np.array([[0, 0, 1]], dtype=np.float32)
    found = embedding_near_duplicates(vectors, threshold=0.95, reference=reference)
    assert found == {1: ("embedding_duplicate_synthetic", 0), 3: ("embedding_duplicate_raw", 0)}
    best, where = max_similarity(vectors, reference)
    assert where.tolist() == [0, 0, 0, 0] and best[3] == pytest.approx(1.0)
