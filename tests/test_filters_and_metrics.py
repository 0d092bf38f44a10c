import numpy as np
import pandas as pd

from raydag.evaluate import accuracy, confusion_matrix, macro_f1
from raydag.filters.exact import later_copies, normalize_text, row_filter_reason, text_key


def test_normalize_text():
    assert normalize_text('  "Where IS  my\tparcel?!" ') == "where is my parcel"
    assert normalize_text("Ｆｕｌｌ width") == "full width"
    # every Unicode space collapses, as re.sub(r"\s+", " ") would collapse it
    spaces = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())
    assert normalize_text(f"{spaces}a{spaces}b\u3000c{spaces}.") == "a b c"
    assert normalize_text("'  a\u00a0 - b ' ") == "a - b"


def test_row_filters_name_the_first_reason_that_applies():
    texts = ["", "ok text here", "x" * 700, "A test sentence.", "raw copy", "short"]
    reasons = [row_filter_reason(t, raw_norms=frozenset({"raw copy"}),
                                 test_norms=frozenset({"a test sentence"}), min_chars=6,
                                 max_chars=600) for t in texts]
    assert reasons == ["too_short", None, "too_long", "test_copy", "raw_duplicate", "too_short"]


def test_later_copies_are_found_by_normalised_key_in_order():
    keys = pd.DataFrame({"_order": [5, 2, 9, 1, 7],
                         "_key": [text_key("Same text"), text_key("same  TEXT!"), text_key("same text"),
                                  text_key("other"), text_key("Other.")]})
    assert later_copies(keys) == {5, 9, 7}
    assert text_key("a") != text_key("b")


def test_accuracy_and_macro_f1_against_hand_computed_values():
    cm = confusion_matrix([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert accuracy(cm) == 4 / 6
    f1 = [2 * 1 / (2 + 2), 2 * 2 / (3 + 2), 2 * 1 / (1 + 2)]
    assert np.isclose(macro_f1(cm), np.mean(f1))
    assert macro_f1(np.zeros((2, 2), dtype=int)) == 0.0


def test_dedup_on_ray_data_keeps_the_earliest_copy_and_loses_no_row(ray_local):
    import ray

    from raydag.stages import deduplicate

    texts = ["Where is my parcel?", "where is my  parcel", "Refund please, order #1", "",
             "New unique message here", "WHERE IS MY PARCEL!", "Refund please, order #1"]
    status = ["accepted", "accepted", "accepted", "quarantined", "accepted", "accepted", "dropped"]
    rows = pd.DataFrame({"_order": range(len(texts)), "text": texts, "_status": status,
                         "_reason": ["", "", "", "empty_generation", "", "", "too_long"],
                         "_stage": ""})
    out = deduplicate(ray.data.from_pandas(rows).repartition(3)).to_pandas().sort_values("_order")
    assert len(out) == len(texts)
    assert out["_status"].tolist() == ["accepted", "dropped", "accepted", "quarantined",
                                       "accepted", "dropped", "dropped"]
    assert out["_reason"].tolist() == ["", "synthetic_duplicate", "", "empty_generation", "",
                                       "synthetic_duplicate", "too_long"]
    # nothing accepted: nothing to shuffle, every row comes back unchanged
    none = rows.assign(_status="dropped")
    out = deduplicate(ray.data.from_pandas(none).repartition(2)).to_pandas()
    assert len(out) == len(texts) and (out["_stage"] == "").all()


def test_column_chain_names_the_stage_and_the_missing_column():
    import pytest

    from raydag.errors import ColumnContractError
    from raydag.stages import check_chain

    stages = [("teacher", ("target_label",), ("text",)), ("judge", ("text", "request_index"), ())]
    check_chain(["target_label", "request_index"], stages)
    with pytest.raises(ColumnContractError, match=r"stage 'judge' needs column\(s\) \['request_index'\]"):
        check_chain(["target_label"], stages)
