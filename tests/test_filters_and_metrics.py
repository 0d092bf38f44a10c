import numpy as np
import pandas as pd

from raydag.evaluate import accuracy, confusion_matrix, macro_f1
from raydag.filters.exact import apply_row_filters, drop_synthetic_duplicates, normalize_text


def test_normalize_text():
    assert normalize_text('  "Where IS  my\tparcel?!" ') == "where is my parcel"
    assert normalize_text("Ｆｕｌｌ width") == "full width"


def test_row_filters_give_every_row_a_status_and_reason():
    batch = pd.DataFrame({
        "text": ["", "ok text here", "x" * 700, "A test sentence.", "raw copy", "fine message",
                 "short"],
        "_parse_error": ["empty_generation", None, None, None, None, None, None],
    })
    out = apply_row_filters(batch, raw_norms=frozenset({"raw copy"}),
                            test_norms=frozenset({"a test sentence"}), min_chars=6, max_chars=600)
    assert out["_status"].tolist() == ["quarantined", "accepted", "dropped", "dropped", "dropped",
                                       "accepted", "dropped"]
    assert out["_reason"].tolist() == ["empty_generation", "", "too_long", "test_copy",
                                       "raw_duplicate", "", "too_short"]


def test_synthetic_duplicates_keep_the_earliest_request():
    group = pd.DataFrame({"request_index": [5, 2, 9, 1], "_norm": ["same"] * 4,
                          "_status": ["accepted", "accepted", "accepted", "quarantined"],
                          "_reason": ["", "", "", "empty_generation"]})
    out = drop_synthetic_duplicates(group)
    assert out["_status"].tolist() == ["dropped", "accepted", "dropped", "quarantined"]
    assert out["_reason"].tolist() == ["synthetic_duplicate", "", "synthetic_duplicate",
                                       "empty_generation"]


def test_accuracy_and_macro_f1_against_hand_computed_values():
    cm = confusion_matrix([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert accuracy(cm) == 4 / 6
    f1 = [2 * 1 / (2 + 2), 2 * 2 / (3 + 2), 2 * 1 / (1 + 2)]
    assert np.isclose(macro_f1(cm), np.mean(f1))
    assert macro_f1(np.zeros((2, 2), dtype=int)) == 0.0


def test_filter_chain_on_ray_data_catches_planted_copies_and_loses_no_row(ray_local):
    import ray

    from raydag.stages import filter_generations

    texts = ["Where is my parcel?", "where is my  parcel", "Refund please, order #1",
             "A raw example text", "The copied test sentence", "", "New unique message here",
             "WHERE IS MY PARCEL!"]
    errors = [None, None, None, None, None, "empty_generation", None, None]
    rows = pd.DataFrame({"request_index": range(len(texts)), "text": texts, "_parse_error": errors})
    out = filter_generations(
        ray.data.from_pandas(rows).repartition(3),
        raw_norms=frozenset({"a raw example text"}),
        test_norms=frozenset({"the copied test sentence"}), min_chars=5, max_chars=600,
    ).to_pandas().sort_values("request_index")
    assert len(out) == len(texts)
    assert out["_status"].tolist() == ["accepted", "dropped", "accepted", "dropped", "dropped",
                                       "quarantined", "accepted", "dropped"]
    assert out["_reason"].tolist() == ["", "synthetic_duplicate", "", "raw_duplicate", "test_copy",
                                       "empty_generation", "", "synthetic_duplicate"]


def test_column_chain_names_the_stage_and_the_missing_column():
    import pytest

    from raydag.errors import ColumnContractError
    from raydag.stages import FILTER_ADDS, FILTER_REQUIRES, check_chain

    stages = [("teacher", ("target_label",), ("text", "_parse_error")),
              ("filters", FILTER_REQUIRES, FILTER_ADDS)]
    check_chain(["target_label", "request_index"], stages)
    with pytest.raises(ColumnContractError, match=r"stage 'filters' needs column\(s\) \['request_index'\]"):
        check_chain(["target_label"], stages)
