"""Question-passage pairs: read them from JSON Lines, CSV or TSV, tokenise them once, batch them by length.

A file holds one (question, passage) pair per row with the keys or columns `qid` (optional), `question`,
`passage` and `label` (0/1, absent in unlabelled files). Rows without a qid are grouped by identical
question text. Every bad row is reported as `file:line: field: message`.
"""

import csv
import hashlib
import io
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMATS_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
_CSV_DELIMITERS = {"csv": ",", "tsv": "\t"}
_LABELS: dict[Any, int] = {0: 0, 1: 1, "0": 0, "1": 1}
# Chunks of this many batches are sorted by length: padding stays small while batches still mix.
_BUCKET_BATCHES = 50


@dataclass(frozen=True, slots=True)
class Pair:
    """One (question, passage) pair; `label` 1 when the passage answers the question, None if unlabelled."""

    qid: str
    question: str
    passage: str
    label: int | None


class DataError(ValueError):
    """A bad input file: str(err) is "{file}:{line}: {field}: {message}".

    line is 1-based, 0 (and field '') when the error is about the whole file.
    """

    def __init__(self, file: str, line: int, field: str, message: str) -> None:
        super().__init__(f"{file}:{line}: {field}: {message}")
        self.file = file
        self.line = line
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[type["DataError"], tuple[str, int, str, str]]:
        # Celery pickles a task's exception: rebuild it from the four fields, not from str(err).
        return (type(self), (self.file, self.line, self.field, self.message))


@dataclass
class ReadResult:
    """The pairs of one file, how many bad rows were skipped, and the format it was read as."""

    pairs: list[Pair]
    skipped: int
    format: str

    @property
    def questions(self) -> int:
        """Number of distinct questions (qids)."""
        return len({p.qid for p in self.pairs})

    @property
    def positives(self) -> int:
        """Number of pairs labelled 1."""
        return sum(1 for p in self.pairs if p.label == 1)


def read_pairs(
    path: str | Path,
    *,
    labelled: bool | None = None,
    skip_bad: bool = False,
    fmt: str | None = None,
    max_errors: int = 20,
) -> ReadResult:
    """Read and validate the pairs of a JSON Lines, CSV or TSV file (format from `fmt` or the suffix).

    labelled=True requires a valid label on every row; labelled=False reads pairs with label None (a label
    that is present must still be 0/1); labelled=None infers it from the first row, then requires it on
    every row. A bad row raises DataError; with skip_bad it is logged and counted in `skipped` instead,
    until more than `max_errors` rows are bad, which raises DataError (the file is likely the wrong kind).
    """
    path = Path(path)
    name = str(path)
    fmt = _choose_format(path, fmt)
    text = _read_text(path)
    rows = _iter_json_rows(name, text) if fmt == "jsonl" else _iter_delimited_rows(name, text, fmt)

    pairs: list[Pair] = []
    qids_by_question: dict[str, str] = {}
    inferred = labelled is None
    skipped = 0
    seen_rows = 0
    for line, row in rows:
        seen_rows += 1
        try:
            if isinstance(row, DataError):
                raise row
            if labelled is None:
                labelled = _has_value(row.get("label"))
            pair = _make_pair(name, line, row, labelled, qids_by_question)
            if inferred and not labelled and _has_value(row.get("label")):
                raise DataError(name, line, "label", "unexpected: the first row has no label, so no row may")
            pairs.append(pair)
        except DataError as err:
            if not skip_bad:
                raise
            skipped += 1
            if skipped > max_errors:
                raise DataError(
                    err.file, err.line, err.field, f"{err.message} (more than {max_errors} bad rows: stopped)"
                ) from err
            logger.warning("skipping bad row: %s", err)
    if not seen_rows:
        raise DataError(name, 0, "", "the file holds no pairs")
    if not pairs:
        raise DataError(name, 0, "", f"no valid pairs: all {skipped} rows are bad")
    if skipped:
        logger.warning("%s: skipped %d bad rows, read %d pairs", name, skipped, len(pairs))
    return ReadResult(pairs=pairs, skipped=skipped, format=fmt)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of the file's content, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def group_by_question(pairs: Sequence[Pair]) -> list[list[int]]:
    """Indices of the pairs of each qid, questions in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(pair.qid, []).append(i)
    return list(groups.values())


def _choose_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in _CSV_DELIMITERS and fmt != "jsonl":
            raise DataError(str(path), 0, "format", f"unknown format {fmt!r}; use 'jsonl', 'csv' or 'tsv'")
        return fmt
    suffix = path.suffix.lower()
    if suffix not in FORMATS_BY_SUFFIX:
        accepted = ", ".join(FORMATS_BY_SUFFIX)
        raise DataError(str(path), 0, "format", f"unknown file suffix {suffix!r}; use one of {accepted}")
    return FORMATS_BY_SUFFIX[suffix]


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(str(path), 0, "", f"cannot read the file: {err.strerror or err}") from err
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(str(path), line, "", "not UTF-8 text") from err


def _iter_json_rows(name: str, text: str) -> Iterator[tuple[int, dict | DataError]]:
    # Split on "\n" only: str.splitlines would also split on U+2028, which JSON strings may hold raw.
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as err:
            yield number, DataError(name, number, "", f"malformed JSON: {err.msg} at column {err.colno}")
            continue
        if isinstance(row, dict):
            yield number, row
        else:
            yield number, DataError(name, number, "", f"expected a JSON object, found {type(row).__name__}")


def _iter_delimited_rows(name: str, text: str, fmt: str) -> Iterator[tuple[int, dict | DataError]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_CSV_DELIMITERS[fmt])
    header = next(reader, None)
    if header is None:
        return
    header = [h.strip() for h in header]
    missing = [c for c in ("question", "passage") if c not in header]
    if missing:
        found = ", ".join(repr(h) for h in header)
        raise DataError(
            name,
            1,
            "header",
            f"missing column(s) {', '.join(missing)}; the first row must name the "
            f"columns (qid, question, passage, label), found {found}",
        )
    end_of_previous = reader.line_num
    for fields in reader:
        # A quoted field may span lines: report the line the row starts on.
        line, end_of_previous = end_of_previous + 1, reader.line_num
        if not fields:
            continue
        if len(fields) != len(header):
            yield (
                line,
                DataError(
                    name, line, "", f"expected {len(header)} fields like the header, found {len(fields)}"
                ),
            )
            continue
        yield line, dict(zip(header, fields, strict=True))


def _has_value(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def _make_pair(name: str, line: int, row: dict, labelled: bool, qids_by_question: dict[str, str]) -> Pair:
    question = _read_text_field(name, line, row, "question")
    passage = _read_text_field(name, line, row, "passage")
    raw_label = row.get("label")
    label: int | None = None
    if _has_value(raw_label):
        label = _parse_label(name, line, raw_label)
    elif labelled:
        raise DataError(name, line, "label", "missing: the file is labelled, every row needs a label 0 or 1")
    qid = row.get("qid")
    if _has_value(qid):
        qid = str(qid).strip()
    else:
        qid = qids_by_question.setdefault(question, f"q{len(qids_by_question)}")
    return Pair(qid=qid, question=question, passage=passage, label=label if labelled else None)


def _read_text_field(name: str, line: int, row: dict, field: str) -> str:
    value = row.get(field)
    if value is None:
        raise DataError(name, line, field, "missing")
    if not isinstance(value, str):
        raise DataError(name, line, field, f"must be text, found {type(value).__name__}")
    if not value.strip():
        raise DataError(name, line, field, "empty")
    return value


def _parse_label(name: str, line: int, value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    key = value.strip() if isinstance(value, str) else value
    if isinstance(key, float) or key not in _LABELS:
        raise DataError(name, line, "label", f"must be 0 or 1, found {value!r}")
    return _LABELS[key]


@dataclass
class EncodedPairs:
    """Pairs tokenised once without padding; `collate` pads a batch to its longest pair."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    pad_token_id: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> np.ndarray:
        """Token count of every pair."""
        return np.fromiter((len(ids) for ids in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    def pad(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """The model inputs of these pairs as int64 arrays, right-padded to the longest of them.

        input_ids, attention_mask (and token_type_ids): a pair's row never depends on its batch-mates
        except for the padding columns, which the attention mask hides.
        """
        if not len(indices):
            raise ValueError("pad needs at least one index")
        rows = [self.input_ids[i] for i in indices]
        width = max(len(r) for r in rows)
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, ids in enumerate(rows):
            input_ids[r, : len(ids)] = ids
            attention_mask[r, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.token_type_ids is not None:
            token_type_ids = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(indices):
                types = self.token_type_ids[i]
                token_type_ids[r, : len(types)] = types
            batch["token_type_ids"] = token_type_ids
        return batch

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """`pad` as torch tensors: the batch of these pairs for a forward pass."""
        return {key: torch.from_numpy(array) for key, array in self.pad(indices).items()}


def encode_pairs(pairs: Sequence[Pair], tokenizer: Any, max_length: int) -> EncodedPairs:
    """Tokenise every (question, passage) with a fast tokenizer, cutting the passage to fit max_length."""
    return encode_texts([p.question for p in pairs], [p.passage for p in pairs], tokenizer, max_length)


def encode_texts(questions: Sequence[str], passages: Sequence[str], tokenizer: Any, max_length: int) -> EncodedPairs:
    """Tokenise each (question, passage) on its own terms, cutting the passage to fit max_length.

    A question too long to leave room for its passage is cut too ('longest_first' for that pair only):
    a pair's tokens never depend on the other pairs tokenised with it. Training, evaluation and serving
    all tokenise through here.
    """
    questions, passages = list(questions), list(passages)
    if len(questions) != len(passages):
        raise ValueError(f"{len(questions)} questions but {len(passages)} passages")
    try:
        encoded = _tokenize(tokenizer, questions, passages, max_length, "only_second")
    except Exception:  # the tokenizers library raises a bare Exception when only_second cannot fit
        encoded = _tokenize_with_long_questions(tokenizer, questions, passages, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return EncodedPairs(
        input_ids=encoded["input_ids"], token_type_ids=encoded.get("token_type_ids"), pad_token_id=pad_id
    )


def _tokenize(
    tokenizer: Any, questions: list[str], passages: list[str], max_length: int, truncation: str
) -> dict[str, list[list[int]]]:
    if not questions:
        return {"input_ids": []}
    encoded = tokenizer(
        questions,
        passages,
        truncation=truncation,
        max_length=max_length,
        padding=False,
        return_attention_mask=False,
    )
    return dict(encoded)


def _tokenize_with_long_questions(
    tokenizer: Any, questions: list[str], passages: list[str], max_length: int
) -> dict[str, list[list[int]]]:
    """Encode the pairs whose question leaves no room for a passage 'longest_first', the others as usual."""
    question_ids = tokenizer(questions, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True)
    too_long = np.fromiter((len(ids) >= room for ids in question_ids), dtype=bool, count=len(questions))
    merged: dict[str, list[list[int]]] = {}
    for mask, truncation in ((~too_long, "only_second"), (too_long, "longest_first")):
        picked = np.flatnonzero(mask)
        part = _tokenize(
            tokenizer, [questions[i] for i in picked], [passages[i] for i in picked], max_length, truncation
        )
        for key, values in part.items():
            column = merged.setdefault(key, [[] for _ in questions])
            for i, value in zip(picked, values, strict=True):
                column[i] = value
    return merged


@dataclass
class SeparateEncodings:
    """Questions and passages tokenised apart (for bi-encoders); `collate` pads each side on its own."""

    questions: EncodedPairs
    passages: EncodedPairs

    def __len__(self) -> int:
        return len(self.passages)

    def lengths(self) -> np.ndarray:
        """Token count of every pair, both sides."""
        return self.questions.lengths() + self.passages.lengths()

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """q_input_ids, q_attention_mask, p_input_ids, p_attention_mask of these pairs."""
        q, p = self.questions.collate(indices), self.passages.collate(indices)
        return {
            "q_input_ids": q["input_ids"],
            "q_attention_mask": q["attention_mask"],
            "p_input_ids": p["input_ids"],
            "p_attention_mask": p["attention_mask"],
        }


def encode_separately(pairs: Sequence[Pair], tokenizer: Any, max_length: int) -> SeparateEncodings:
    """Tokenise every question and every passage on its own, each cut to max_length."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(texts: list[str]) -> EncodedPairs:
        ids = tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False)["input_ids"]
        return EncodedPairs(input_ids=ids if texts else [], token_type_ids=None, pad_token_id=pad_id)

    return SeparateEncodings(encode([p.question for p in pairs]), encode([p.passage for p in pairs]))


def questions_per_batch(num_pairs: int, num_questions: int, batch_size: int) -> int:
    """How many whole questions make a batch of about `batch_size` pairs, at least one."""
    return max(1, round(batch_size * num_questions / max(1, num_pairs)))


def group_batches(
    groups: Sequence[Sequence[int]],
    *,
    questions: int,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
) -> list[list[int]]:
    """Batches of `questions` whole questions each (their pair indices); deterministic for (seed, epoch).

    Ranking losses compare a question's candidates with each other, so a question is never split.
    """
    if questions < 1:
        raise ValueError(f"questions must be >= 1, got {questions}")
    order = np.arange(len(groups))
    if shuffle:
        np.random.default_rng([seed, epoch]).shuffle(order)
    return [
        [i for g in order[start : start + questions] for i in groups[g]] for start in range(0, len(order), questions)
    ]


def iter_batches(
    encodings: EncodedPairs, *, batch_size: int, shuffle: bool, seed: int, epoch: int = 0, bucket: bool = True
) -> list[list[int]]:
    """Batches of pair indices covering every pair once; deterministic for (seed, epoch).

    With bucket, chunks of ~50 batches are sorted by length so a batch pads little; with shuffle, the
    order (and then the batches) is shuffled by a numpy Generator seeded with (seed, epoch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.arange(len(encodings))
    rng = np.random.default_rng([seed, epoch]) if shuffle else None
    if rng is not None:
        rng.shuffle(order)
    if bucket:
        lengths = encodings.lengths()
        chunk = batch_size * _BUCKET_BATCHES
        chunks = np.split(order, range(chunk, len(order), chunk)) if len(order) else []
        if chunks:
            order = np.concatenate([part[np.argsort(lengths[part], kind="stable")] for part in chunks])
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if rng is not None and bucket:
        # Sorted chunks would otherwise feed batches from short to long within each chunk.
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches
