"""Redact server details from text a tenant reads: paths, database and broker addresses, tenant ids.

Job events and errors are written by the worker and the ML core, which name the folders they work in
and pass on library errors (a psycopg error names the database's host and port). The API shows them
to tenants only through these functions, so that no message tells one tenant where the server keeps
its files, where its database listens, or under which tenant id another's artifacts lie.
"""

import re
from typing import Any

_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()]+")
# psycopg: 'connection to server at "10.0.0.5", port 5432 failed'; redis-py: 'connecting to redis:6379.'
_QUOTED_HOST_PORT = re.compile(r"\"[^\"\s]*\",? port \d+")
_CONNECTING_TO = re.compile(r"\b(connecting to|connect to|connection to) [\w.\-\[\]:]+:\d+")
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d{1,5})?\b")
_TENANT_ID = re.compile(r"\bten_[0-9a-f]{24}\b")
# An absolute path: a '/' that does not continue a word, a number or another path, then path characters.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/:-])/[^\s'\"`,;()\[\]{}<>]+")
_JOB_FOLDER = re.compile(r"/job_[0-9a-f]{24}/")

ADDRESS = "<address>"
TENANT = "<tenant>"


def _shorten_path(match: re.Match[str]) -> str:
    # Inside a job's folder the rest still tells the user which teacher or student it is; elsewhere the
    # last part alone (a file or model folder name) does.
    path = match.group(0).rstrip(".")
    tail = match.group(0)[len(path) :]
    inside_job = _JOB_FOLDER.split(path)
    if len(inside_job) > 1 and inside_job[-1]:
        return inside_job[-1] + tail
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return (f".../{name}" if name else "...") + tail


def redact_text(text: str) -> str:
    """`text` with URLs, network addresses, absolute paths and tenant ids replaced by placeholders."""
    text = _URL.sub(ADDRESS, text)
    text = _QUOTED_HOST_PORT.sub(ADDRESS, text)
    text = _CONNECTING_TO.sub(lambda m: f"{m.group(1)} {ADDRESS}", text)
    text = _ABSOLUTE_PATH.sub(_shorten_path, text)
    text = _IPV4.sub(ADDRESS, text)
    return _TENANT_ID.sub(TENANT, text)


def redact_json(value: Any) -> Any:
    """`value` (JSON-like) with every string redacted as by `redact_text`; keys are left as they are."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: redact_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_json(item) for item in value]
    return value
