"""Prometheus metrics of the answering path, on the default registry that `/metrics` exposes.

Aggregates over every model: `/metrics` needs no API key, so a label naming a tenant's model would
show one tenant the names (and the traffic) of another's.
"""

from prometheus_client import Counter, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_QUEUE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

REQUEST_LATENCY = Histogram(
    "qadistill_answer_latency_seconds",
    "Time to answer one question, from arrival at the serving runtime to its ranked passages.",
    buckets=_LATENCY_BUCKETS,
)
QUEUE_TIME = Histogram(
    "qadistill_answer_queue_seconds",
    "Time a question waited in the micro-batching queue before its batch started.",
    buckets=_QUEUE_BUCKETS,
)
BATCH_REQUESTS = Histogram(
    "qadistill_batch_requests",
    "Questions merged into one inference batch.",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
)
BATCH_PAIRS = Histogram(
    "qadistill_batch_pairs",
    "(question, passage) pairs in one inference batch.",
    buckets=(1, 5, 10, 20, 40, 80, 160, 320, 640),
)
ERRORS = Counter(
    "qadistill_answer_errors_total",
    "Questions that got no answer, by reason (queue_full, inference, load).",
    ["reason"],
)
