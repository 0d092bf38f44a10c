"""PII redaction (raydag.filters.pii) and co-annotation routing / Label Studio exchange
(raydag.ops.coannotate). Pure functions: no Ray, no engine."""

from __future__ import annotations

import copy
import json
import math
import xml.etree.ElementTree as ET

import pytest

from raydag.errors import DataError
from raydag.filters.pii import PII_TYPES, PiiMatch, find_pii, luhn_valid, redact, redact_columns
from raydag.ops.coannotate import (label_studio_config, label_studio_tasks,
                                   read_label_studio_export, route, uncertainty)


def spans(text: str, types=PII_TYPES) -> list[tuple[str, str]]:
    return [(m.type, m.text) for m in find_pii(text, types)]


def at(text: str, pii_type: str, piece: str) -> PiiMatch:
    start = text.index(piece)
    return PiiMatch(pii_type, start, start + len(piece), piece)


# --- PII: each type, exact spans -----------------------------------------------------------------

def test_every_type_is_found_with_exact_spans_in_one_review():
    text = ("Loved it! Dr. Jane Smith from the cinema wrote to me at "
            "jane.smith+films@example.co.uk, call her on +44 20 7946 0958. "
            "I paid with 4111 1111 1111 1111 from 192.168.1.20.")
    assert find_pii(text) == [
        at(text, "person", "Dr. Jane Smith"),
        at(text, "email", "jane.smith+films@example.co.uk"),
        at(text, "phone", "+44 20 7946 0958"),
        at(text, "card", "4111 1111 1111 1111"),
        at(text, "ip", "192.168.1.20"),
    ]


@pytest.mark.parametrize("text, email", [
    ("Send the spoilers to bob_99@mail.example.com please.", "bob_99@mail.example.com"),
    ("Contact: <film.club@uni-example.org>", "film.club@uni-example.org"),
    ("Reviewed by ANNA.K@EXAMPLE.NET.", "ANNA.K@EXAMPLE.NET"),
])
def test_emails(text, email):
    assert find_pii(text) == [at(text, "email", email)]


@pytest.mark.parametrize("text, phone", [
    ("Call the box office at (415) 555-0100 before Friday.", "(415) 555-0100"),
    ("Tickets: 415.555.0199, ask for the matinee.", "415.555.0199"),
    ("US line 415-555-0123 is closed.", "415-555-0123"),
    ("My mobile is 07700 900123 if the stream breaks.", "07700 900123"),
    ("Ring 020 7946 0958 for group bookings.", "020 7946 0958"),
    ("Or text 07700900123 anytime.", "07700900123"),
    ("From Germany: +49 151 12345678.", "+49 151 12345678"),
    ("Support +1 (415) 555-0100 ext 4.", "+1 (415) 555-0100"),
    ("Dial 0044 20 7946 0958 from abroad.", "0044 20 7946 0958"),
    ("Compact +4915112345678 works too.", "+4915112345678"),
    ("UK with trunk: +44 (0)20 7946 0958.", "+44 (0)20 7946 0958"),
])
def test_phone_formats(text, phone):
    assert find_pii(text) == [at(text, "phone", phone)]


@pytest.mark.parametrize("text", [
    "It came out in 1999 and I give it 3.5 stars.",
    "Seen on 2023-01-15, then again on 15.01.2023 and 01/15/2023.",
    "The premiere was 2023-01-15 1930 at the Odeon.",
    "It cost $1,299.99 on Blu-ray, or € 120 999 000 to make.",
    "A budget of $120 000 000 and a gross of 123.456.789,00 euros.",
    "It sold 1 234 567 890 tickets, honestly.",
    "Sequels in 1999 2000 2001 were all worse.",
    "Order 123456789012 arrived late.",
    "Runtime 2:15:30, rated 8.7/10, version 1.2.3, 555-0100 is fake.",
    "Reference 4111-1111-1111-1112 was declined.",
])
def test_no_phone_or_card_in_dates_years_prices_and_plain_numbers(text):
    assert spans(text) == []


def test_cards_need_a_valid_luhn_checksum_and_card_grouping():
    assert luhn_valid("4111111111111111") and luhn_valid("378282246310005")
    assert not luhn_valid("4111111111111112") and not luhn_valid("1234567812345678")
    text = ("Cards: 4111-1111-1111-1111, 3782 822463 10005, 5555555555554444; "
            "not 1234 5678 1234 5678.")
    assert spans(text) == [("card", "4111-1111-1111-1111"), ("card", "3782 822463 10005"),
                           ("card", "5555555555554444")]
    # Luhn-valid digits in a phone-like grouping are not a card.
    assert spans("Mixed 4111 1111-1111 1111 separators.") == []


def test_ip_addresses_v4_and_v6():
    text = "Streams from 10.0.0.7 and 2001:db8::8a2e:370:7334 and ::ffff:192.0.2.1 went down."
    assert spans(text) == [("ip", "10.0.0.7"), ("ip", "2001:db8::8a2e:370:7334"),
                           ("ip", "::ffff:192.0.2.1")]
    assert spans("Not an address: 256.1.1.1, 10.0.0, at 10:30:45 or ratio 16:9.") == []


def test_an_ip_is_never_also_a_phone_and_email_digits_are_not_phones():
    text = "Host 100.200.150.250, mail 4155550100@example.com"
    assert spans(text) == [("ip", "100.200.150.250"), ("email", "4155550100@example.com")]
    # Asking for phones only does not turn the IP or the e-mail into phones.
    assert spans(text, types=("phone",)) == []


# --- PII: person names ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, names", [
    ("Dr. Jane Smith gave it five stars.", ["Dr. Jane Smith"]),
    ("Even Mr Brown liked it.", ["Mr Brown"]),
    ("Ask Prof. A. Turing or Mrs. O'Brien-Smith.", ["Prof. A. Turing", "Mrs. O'Brien-Smith"]),
    ("I watched it with John Carter's brother.", ["John Carter"]),
    ("Tom Hanks and Meg Ryan were great together.", ["Tom Hanks", "Meg Ryan"]),
    ("The cast: Emma Stone Ryan Gosling.", ["Emma Stone", "Ryan Gosling"]),
    ("Philip Seymour Hoffman steals every scene.", ["Philip Seymour Hoffman"]),
    ("A film about John F. Kennedy and Vincent van Gogh.", ["John F. Kennedy", "Vincent van Gogh"]),
    ("Directed by José McDonald in 2004.", []),  # "José" is not in the first-name list
])
def test_person_names_with_honorifics_and_gazetteer(text, names):
    assert [m.text for m in find_pii(text)] == names


REVIEWS = [
    "The Matrix still holds up after all these years.",
    "I loved it, and my kids did too.",
    "We saw it in New York on opening night.",
    "Honestly, the ending of Inception left me speechless.",
    "The Grand Budapest Hotel is a visual treat from start to finish.",
    "If you liked Star Wars, you will love this one.",
    "It was filmed in Los Angeles and San Francisco, and it shows.",
    "The Lord of the Rings trilogy set the bar too high for sequels like this.",
    "Saving Private Ryan is still the best war movie I have seen.",
    "The cinematography in Blade Runner 2049 is stunning.",
    "Will it win an Oscar? Probably not, but May and June releases rarely do.",
    "Watched it on Netflix last Friday with the whole family.",
    "The London premiere was packed, and the Paris one sold out in March.",
    "Mark my words: the sequel will flop at the Box Office.",
    "Frozen II is fine, but the original Toy Story is a masterpiece.",
    "We drove from St. Louis to Madison Square Garden for the screening.",
    "The St. Louis Cardinals cameo in the second act made me laugh.",
    "Jack and Jill Went Up the Hill is a terrible title for a film.",
    "Grace under pressure is what the lead shows in every scene.",
    "John was great, but the script let him down.",  # a lone first name is skipped
]


def test_ordinary_review_sentences_have_no_person_names():
    assert {review: spans(review) for review in REVIEWS} == {review: [] for review in REVIEWS}


# --- PII: redact ---------------------------------------------------------------------------------

def test_the_cheap_screens_skip_no_match():
    """find_pii runs a detector only where a cheap test says it can match ("@", ":", a digit,
    a capital letter). The screens must never hide a match: every capital the name patterns
    know changes under lower(), and a piece of each type found alone is still found inside
    texts that the other screens would skip."""
    import re

    from raydag.filters import pii

    capitals = [chr(c) for c in range(0x10000)
                if re.fullmatch(f"[{pii._UPPER}]", chr(c))]
    assert len(capitals) == 26 + 23 + 7 and all(c.lower() != c for c in capitals)
    pieces = {"email": "ann@example.com", "ip": "10.0.0.7", "card": "4111 1111 1111 1111",
              "phone": "+1 (555) 123-4567", "person": "Dr. Jane Smith"}
    for kind, piece in pieces.items():
        for text in (piece, f"write to {piece} today", f"Note: {piece}, at noon"):
            assert [m.text for m in find_pii(text) if m.type == kind] == [piece], text
    assert [m.text for m in find_pii("ip fe80::1 here")] == ["fe80::1"]
    assert [m.type for m in find_pii("call +٣٤ ٥٥٥ ١٢٣ ٤٥٦٧")] == ["phone"]  # Arabic-Indic digits


def test_redact_replaces_each_match_and_counts_by_type():
    text = ("Mr Brown (brown@example.com, brown2@example.com) said call 020 7946 0958 "
            "or see 10.1.2.3; card 4111 1111 1111 1111.")
    redacted, counts = redact(text)
    assert redacted == ("[PERSON] ([EMAIL], [EMAIL]) said call [PHONE] "
                        "or see [IP]; card [CARD].")
    assert counts == {"email": 2, "phone": 1, "card": 1, "ip": 1, "person": 1}
    assert redact("Nothing to hide here.") == ("Nothing to hide here.", {})


def test_redact_only_the_types_asked_for():
    text = "Dr. Jane Smith: jane@example.org"
    assert redact(text, types=("email",)) == ("Dr. Jane Smith: [EMAIL]", {"email": 1})
    with pytest.raises(ValueError, match="unknown PII type.*'name'"):
        redact(text, types=("email", "name"))


def test_redact_columns_sums_counts_and_skips_missing_or_none_columns():
    row = {"id": "r1", "text": "Mail Tom Hanks at tom@example.com", "title": None,
           "rewrite": "Tom Hanks again, tom@example.com or +1 415 555 0100", "label": "pos"}
    original = copy.deepcopy(row)
    out, counts = redact_columns(row, ["text", "title", "rewrite", "missing"])
    assert out == {"id": "r1", "text": "Mail [PERSON] at [EMAIL]", "title": None,
                   "rewrite": "[PERSON] again, [EMAIL] or [PHONE]", "label": "pos"}
    assert counts == {"email": 2, "phone": 1, "person": 2}
    assert row == original  # the input row is not changed


# --- co-annotation: uncertainty ------------------------------------------------------------------

def test_vote_entropy_unanimous_is_zero_and_even_split_is_one():
    assert uncertainty({"label_votes": json.dumps(["pos"] * 5)}) == 0.0
    assert uncertainty({"label_votes": json.dumps(["pos", "neg", "pos", "neg"])}) == 1.0
    assert uncertainty({"label_votes": ["a", "b", "c"]}, measure="entropy") == pytest.approx(1.0)
    two_to_one = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    votes = {"label_votes": '["a", "a", "b"]'}
    assert uncertainty(votes) == pytest.approx(two_to_one / math.log(2))
    # With the label set's size the scale is the largest entropy 3 votes can reach over 3 labels.
    assert uncertainty(votes, num_labels=3) == pytest.approx(two_to_one / math.log(3))
    # A vote outside the label set (null) counts as one more outcome.
    assert uncertainty({"label_votes": '["a", null]'}) == 1.0


def test_margin_measure_and_auto_choice():
    assert uncertainty({"label_margin": 0.8}) == pytest.approx(0.2)
    assert uncertainty({"label_margin": 0.8}, measure="margin") == pytest.approx(0.2)
    assert uncertainty({"label_margin": 1.2}) == 0.0  # clipped
    # auto prefers votes when there are 2+, and falls back to the margin for a single vote.
    both = {"label_votes": '["a", "b"]', "label_margin": 0.9}
    assert uncertainty(both) == 1.0
    assert uncertainty(both, measure="margin") == pytest.approx(0.1)
    assert uncertainty({"label_votes": '["a"]', "label_margin": 0.9}) == pytest.approx(0.1)


def test_uncertainty_errors_name_the_missing_column():
    with pytest.raises(ValueError, match="label_margin"):
        uncertainty({"label": "a"})
    with pytest.raises(ValueError, match="label_votes"):
        uncertainty({"label_margin": 0.5}, measure="entropy")
    with pytest.raises(ValueError, match="label_margin"):
        uncertainty({"label_votes": '["a", "b"]'}, measure="margin")
    with pytest.raises(ValueError, match="label_margin is NaN"):
        uncertainty({"label_margin": float("nan")})
    with pytest.raises(ValueError, match="unknown uncertainty measure 'variance'"):
        uncertainty({"label_margin": 0.5}, measure="variance")


# --- co-annotation: routing ----------------------------------------------------------------------

def test_route_by_thresholds_with_inclusive_human_band():
    assert route([0.0, 0.2, 0.3, 0.5, 0.9, 0.95, 1.0], accept_below=0.3, drop_above=0.9,
                 human_budget=10) == ["auto", "auto", "human", "human", "human", "drop", "drop"]


def test_budget_keeps_the_most_uncertain_and_sends_the_rest_to_overflow():
    u = [0.5, 0.8, 0.6, 0.8, 0.4, 0.05]
    assert route(u, accept_below=0.1, drop_above=1.0, human_budget=2) == \
        ["auto", "human", "auto", "human", "auto", "auto"]
    assert route(u, accept_below=0.1, drop_above=1.0, human_budget=3, overflow="drop") == \
        ["drop", "human", "human", "human", "drop", "auto"]
    # Equal uncertainties: the earlier item keeps its place.
    assert route([0.5, 0.5, 0.5], accept_below=0.1, drop_above=0.9, human_budget=1) == \
        ["human", "auto", "auto"]
    assert route(u, accept_below=0.1, drop_above=1.0, human_budget=0, overflow="drop") == \
        ["drop"] * 5 + ["auto"]


@pytest.mark.parametrize("kwargs, message", [
    ({"accept_below": 0.6, "drop_above": 0.5, "human_budget": 1}, "accept_below <= drop_above"),
    ({"accept_below": -0.1, "drop_above": 0.5, "human_budget": 1}, "0 <= accept_below"),
    ({"accept_below": 0.1, "drop_above": 1.5, "human_budget": 1}, "drop_above <= 1"),
    ({"accept_below": 0.1, "drop_above": 0.9, "human_budget": -1}, "human_budget"),
    ({"accept_below": 0.1, "drop_above": 0.9, "human_budget": 1, "overflow": "queue"}, "overflow"),
])
def test_route_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        route([0.5], **kwargs)


def test_route_rejects_uncertainties_outside_unit_interval():
    with pytest.raises(ValueError, match="item 1"):
        route([0.2, float("nan")], accept_below=0.1, drop_above=0.9, human_budget=1)


# --- co-annotation: Label Studio -----------------------------------------------------------------

LABELS = ["billing", "shipping", "R&D"]
ROWS = [
    {"id": "r1", "text": "Refund my card", "label": "billing", "label_confidence": 0.55},
    {"id": "r2", "text": "Where is my parcel?", "label": "shipping", "label_confidence": 0.51},
    {"id": "r3", "text": "Prototype feedback", "label": "R&D", "label_confidence": float("nan")},
    {"id": "r4", "text": "Cancelled one", "label": "billing", "label_confidence": 0.6},
    {"id": "r5", "text": "Nobody got here", "label": "billing", "label_confidence": 0.5},
]


def test_label_studio_config_is_valid_xml_with_escaped_choices():
    root = ET.fromstring(label_studio_config(LABELS))
    assert root.tag == "View"
    text, choices = list(root)
    assert (text.tag, text.attrib) == ("Text", {"name": "text", "value": "$text"})
    assert choices.tag == "Choices"
    assert choices.attrib["name"] == "label" and choices.attrib["toName"] == "text"
    assert choices.attrib["choice"] == "single"
    assert [c.attrib["value"] for c in choices] == LABELS
    with pytest.raises(ValueError, match="unique"):
        label_studio_config(["a", "a"])


def test_label_studio_tasks_carry_the_teacher_label_as_a_prediction():
    tasks = label_studio_tasks(ROWS[:3], model_version="teacher-qwen")
    assert tasks[0] == {
        "data": {"text": "Refund my card", "raydag_id": "r1"},
        "predictions": [{
            "model_version": "teacher-qwen",
            "score": 0.55,
            "result": [{"from_name": "label", "to_name": "text", "type": "choices",
                        "value": {"choices": ["billing"]}}],
        }],
    }
    assert "score" not in tasks[2]["predictions"][0]  # NaN confidence: no score
    numpy = pytest.importorskip("numpy")
    row = dict(ROWS[0], label_confidence=numpy.float32(0.25))  # as read back from Parquet
    assert label_studio_tasks([row], model_version="m")[0]["predictions"][0]["score"] == 0.25
    json.dumps(tasks, allow_nan=False)  # valid JSON for Label Studio's importer
    with pytest.raises(DataError, match=r"row 0 \(id 'x'\).*\['label'\]"):
        label_studio_tasks([{"id": "x", "text": "t"}], model_version="m")


def _annotation(label, *, by, at, cancelled=False, annotation_id=1, task_id=1):
    """One annotation as Label Studio's JSON export writes it."""
    return {"id": annotation_id, "completed_by": by, "was_cancelled": cancelled,
            "ground_truth": False, "created_at": at, "updated_at": at, "lead_time": 3.2,
            "task": task_id, "result_count": 0, "prediction": {}, "parent_prediction": None,
            "result": [] if label is None else [
                {"id": "a1B2c3", "type": "choices", "origin": "manual", "from_name": "label",
                 "to_name": "text", "value": {"choices": label if isinstance(label, list)
                                              else [label]}}]}


def _export(tasks, annotations_by_index):
    """Label Studio's JSON export of imported ``tasks``: ids assigned, annotations added."""
    exported = []
    for index, task in enumerate(tasks):
        task_id = 100 + index
        exported.append({"id": task_id, "data": task["data"], "meta": {}, "project": 3,
                         "created_at": "2026-01-05T09:00:00.000000Z",
                         "updated_at": "2026-01-05T11:00:00.000000Z",
                         "annotations": annotations_by_index.get(index, []),
                         "predictions": [dict(p, id=index, task=task_id, created_ago="2 hours")
                                         for p in task["predictions"]],
                         "drafts": [], "inner_id": index + 1, "total_annotations": 0,
                         "cancelled_annotations": 0})
    return exported


def test_round_trip_tasks_to_export_and_back(tmp_path):
    tasks = label_studio_tasks(ROWS, model_version="teacher")
    export = _export(tasks, {
        # r1: relabelled twice; the later annotation (by updated_at) wins, whatever the order.
        0: [_annotation("shipping", by=7, at="2026-01-05T10:30:00.000000Z", annotation_id=2),
            _annotation("billing", by=3, at="2026-01-05T10:00:00.000000Z", annotation_id=1)],
        # r2: a cancelled (skipped) annotation and a real one.
        1: [_annotation(None, by=3, at="2026-01-05T12:00:00Z", cancelled=True),
            _annotation("shipping", by={"id": 4, "email": "ann@example.com"},
                        at="2026-01-05T10:15:00Z")],
        2: [_annotation("R&D", by=3, at="2026-01-06T08:00:00Z")],
        # r4: every annotation cancelled; r5: never annotated.
        3: [_annotation(None, by=3, at="2026-01-05T10:00:00Z", cancelled=True)],
    })
    path = tmp_path / "project-3-at-2026-01-06.json"
    path.write_text(json.dumps(export))
    records, counts = read_label_studio_export(path, LABELS)
    assert records == [
        {"id": "r1", "label": "shipping", "annotator": "7",
         "annotated_at": "2026-01-05T10:30:00.000000Z", "task_id": 100},
        {"id": "r2", "label": "shipping", "annotator": "ann@example.com",
         "annotated_at": "2026-01-05T10:15:00Z", "task_id": 101},
        {"id": "r3", "label": "R&D", "annotator": "3", "annotated_at": "2026-01-06T08:00:00Z",
         "task_id": 102},
    ]
    assert counts == {"tasks": 5, "labelled": 3, "skipped_unannotated": 1, "cancelled": 1}
    assert read_label_studio_export(export, LABELS) == (records, counts)


def _one_task_export(label, data=None):
    return [{"id": 42, "data": data if data is not None else {"text": "t", "raydag_id": "r9"},
             "annotations": [_annotation(label, by=1, at="2026-01-05T10:00:00Z")]}]


def test_unknown_label_error_names_the_task_and_the_allowed_labels():
    with pytest.raises(DataError) as caught:
        read_label_studio_export(_one_task_export("refunds"), LABELS)
    message = str(caught.value)
    assert "task #0 (id 42, raydag_id r9)" in message
    assert "unknown label 'refunds'" in message and "billing, shipping, R&D" in message


@pytest.mark.parametrize("export, message", [
    (_one_task_export("billing", data={"text": "t"}), r"task #0 \(id 42\): missing data.raydag_id"),
    (_one_task_export(["billing", "shipping"]), r"task #0 \(id 42, raydag_id r9\): more than one"),
    (_one_task_export(None), "no choice for 'label'"),
    (_one_task_export("billing") + _one_task_export("billing"),
     r"task #1 .*already labelled by task #0"),
    ({"tasks": []}, "list of tasks"),
])
def test_malformed_exports_raise_data_errors(export, message):
    with pytest.raises(DataError, match=message):
        read_label_studio_export(export, LABELS)


def test_unreadable_export_file_names_the_path(tmp_path):
    path = tmp_path / "export.json"
    path.write_text("[{not json")
    with pytest.raises(DataError, match="export.json: cannot read the Label Studio export"):
        read_label_studio_export(path, LABELS)
