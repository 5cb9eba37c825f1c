"""Prometheus metrics of the answering path.

On the default registry, which `/metrics` shows to anyone: aggregates over every model, since a label naming
a tenant's model would show one tenant the names (and the traffic) of another's. Metrics by model and version
are on `BY_MODEL`, which `/metrics` adds only for a caller holding the metrics key (QADISTILL_METRICS_KEY).
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_QUEUE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

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
MODEL_LOAD = Histogram(
    "qadistill_model_load_seconds",
    "Time to load a model version for serving: fetch from the store, load, warm up.",
    buckets=_LOAD_BUCKETS,
)
MODEL_CACHE_BYTES = Gauge("qadistill_model_cache_bytes", "Bytes of the weights of the models loaded for serving.")
MODEL_CACHE_EVICTIONS = Counter(
    "qadistill_model_cache_evictions_total", "Models unloaded to keep under QADISTILL_SERVE_CACHE_BYTES."
)
DOWNLOAD_CACHE_BYTES = Gauge(
    "qadistill_model_download_cache_bytes", "Bytes on disk of model folders fetched from a remote artifact store."
)
DOWNLOAD_EVICTIONS = Counter(
    "qadistill_model_download_evictions_total",
    "Fetched model folders removed to keep under QADISTILL_SERVE_DOWNLOAD_CACHE_BYTES.",
)

BY_MODEL = CollectorRegistry()
MODEL_LATENCY = Histogram(
    "qadistill_model_answer_latency_seconds",
    "Time to answer one question, by model name and version (shown only with the metrics key).",
    ["model", "version"],
    buckets=_LATENCY_BUCKETS,
    registry=BY_MODEL,
)
