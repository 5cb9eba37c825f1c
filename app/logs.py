"""Logging of the api and worker processes: one JSON object per line (or plain text), with the request id.

The api sets the request id of the request it is serving (app/api/errors.py's RequestIds); every log line
written while serving it carries `request_id`, so a user's report (which quotes it) finds the lines.
"""

import logging
import os
import sys
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Third-party libraries' progress bars and weight-loading reports: noise in a service's log (a classifier's
# encoder loads without its head, which is expected). Read when those libraries are first imported.
QUIET_LIBRARIES_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
NOISY_LOGGERS = {"transformers": logging.ERROR, "httpx": logging.WARNING, "botocore": logging.WARNING,
                 "aiobotocore": logging.WARNING, "s3fs": logging.WARNING}  # fmt: skip


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to a record written while a request is served."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


def quiet_third_party() -> None:
    """Keep third-party progress bars and load reports out of this process's log (and its children's)."""
    for name, value in QUIET_LIBRARIES_ENV.items():
        os.environ.setdefault(name, value)
    for name, level in NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def configure_logging(*, process: str, level: str = "INFO", fmt: str = "json") -> None:
    """Send every log line of this process to stderr, once, as JSON (`fmt` 'json') or text ('text')."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                static_fields={"process": process},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    quiet_third_party()
