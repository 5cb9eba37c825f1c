"""Q&A pairs for the tests, made from the project's own demo data (app/demo/qa.jsonl), laid out like the
benchmark data folder: wikiqa/train.jsonl, wikiqa/dev.jsonl, trecqa/dev.jsonl, unlabeled/xquad-en-pairs.jsonl.

The tests need nothing beside the repository. Copies of a demo question get their own qid (`demo-01.c2`).
"""

import json
from pathlib import Path

import app

DEMO = Path(app.__file__).parent / "demo" / "qa.jsonl"
# (file, first and last demo question, copies, labelled)
LAYOUT = (
    ("wikiqa/train.jsonl", 0, 18, 3, True),
    ("wikiqa/dev.jsonl", 18, 24, 2, True),
    ("trecqa/dev.jsonl", 24, 30, 1, True),
    ("unlabeled/xquad-en-pairs.jsonl", 0, 30, 2, False),
)


def write_sample_data(folder: Path) -> Path:
    """Write the sample files under `folder` (once) and return it."""
    rows = [json.loads(line) for line in DEMO.read_text().splitlines() if line.strip()]
    qids = list(dict.fromkeys(row["qid"] for row in rows))
    for name, first, last, copies, labelled in LAYOUT:
        path = folder / name
        if path.is_file():
            continue
        out = []
        for copy in range(copies):
            for row in rows:
                if row["qid"] in qids[first:last]:
                    pair = row | {"qid": f"{row['qid']}.c{copy}"}
                    if not labelled:
                        pair.pop("label")
                    out.append(json.dumps(pair) + "\n")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(out))
    return folder
