"""Retrying what fails for want of the database server (a restart, a dropped connection), with back-off."""

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    stop_when_event_set,
    wait_exponential,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` says the database was unreachable rather than that the request was wrong."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning("database unreachable (%s), retry %d in %.1f s", type(error).__name__, state.attempt_number,
                state.upcoming_sleep)  # fmt: skip


def with_db_retry(call: Callable[[], T], *, max_s: float, give_up: threading.Event | None = None) -> T:
    """`call()`, retried with exponential back-off (0.2 s to 5 s) for up to `max_s` seconds while the error
    is transient; stops early once `give_up` is set. The last error is raised when it never succeeds."""
    stop = stop_after_delay(max_s)
    if give_up is not None:
        stop = stop | stop_when_event_set(give_up)
    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential(multiplier=0.2, max=5),
        stop=stop,
        reraise=True,
        before_sleep=_log_retry,
    )
    return retrying(call)
