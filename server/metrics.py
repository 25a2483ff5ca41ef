"""Prometheus metric families of the server, in one registry owned by the app.

The ``Metrics`` object is created once per app and handed to the components
that record into it (no module-level globals). Every family is prefixed
``sentiment_`` and documented in the README with the question it answers.

Every label value the server can record is created at 0 when ``Metrics`` is
built (``serving_model`` does it for the model's series once a model is
loaded). A labelled counter has no series until its first child exists, and
Prometheus' ``increase()`` cannot see a series' first sample as an increase,
so without this the first OOM, engine failure, failed reload or refusal of a
kind would never fire its alert. Recording a label value not declared here
works but starts the series late: add new values to the constants below
(``REJECTION_REASONS`` is the one list of refusal reasons; a new refusal
anywhere in the server adds its reason there).

The families that describe what the model says (label mix,
confidence, low-confidence and truncated texts) carry ``model`` and ``version``,
so the label mix and the drift signal are per model: after a reload to a model
with other labels, nothing mixes the two. Only the serving model's series exist
(``serving_model`` removes the previous model's on a swap), so their number is
bounded by the serving model's labels, however many reloads happen.

Latency buckets start at 50 us: a short text's queue wait and engine time
are well under a millisecond on a warm server, and a first bucket of 1 ms
would hold them all.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from server.log_writer import lost_log_lines

LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
CONFIDENCE_BUCKETS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0)

# Label values created at 0 at start (see the module docstring).
DEVICES = ("cpu", "cuda")  # oom_events, batch_splits, inference_errors
RELOAD_RESULTS = ("ok", "failed", "refused")  # model_reloads (refused: while an overdue load runs, nothing loaded)
HANDOFF_DIRECTIONS = ("to_worker", "to_loop")  # engine_handoff
PREDICTION_ENDPOINTS = ("/predict", "/", "/v1/models/{name}:predict", "/v2/models/{name}/infer",  # requests, with
                        "/v2/models/{name}/versions/{version}/infer",  # PREDICTION_STATUSES: the shedding, error
                        "/inference.GRPCInferenceService/ModelInfer")  # and giving-up alerts divide by them, and a
PREDICTION_STATUSES = ("200", "499", "500", "503")  # 503 series born at its first 503 left them out (106.8 % shed)
REJECTION_REASONS = (  # rejected: why a request was refused
    "queue_full",  # 503: the batcher's queue is full
    "deadline",  # 503: a request waited past its deadline
    "draining",  # 503: shutting down
    "too_large",  # 413: body, text count or text length over its limit
    "invalid",  # 400/405/422: malformed input or a method the path does not take
    "unauthorized",  # 401: no or wrong API key
    "forbidden",  # 403: the key lacks the role
    "spool_full",  # 503: STORE_DURABILITY=ack and the spool is at SPOOL_MAX_BYTES
    "slow_client",  # 408: headers or body not sent in time
    "too_many_connections",  # refused above MAX_CONNECTIONS
    "unsupported_media_type",  # 415: e.g. an unsupported Content-Encoding
    "not_found",  # 404
    "key_unverifiable",  # 503: an API key this server does not know, while the database is unavailable
    "body_memory_full",  # 503: request bodies in flight hold the memory plan's share for them
    "malformed_http",  # 400: a request httptools cannot parse (request line, headers, chunked framing)
    "too_many_pipelined",  # 429: a request pipelined behind PIPELINE_MAX others on one connection
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=r)
        GCCollector(registry=r)  # python_gc_*: collections by generation (see server/heap.py)

        # traffic
        self.requests = Counter("sentiment_requests", "Requests (HTTP routes, gRPC calls) by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.request_latency = Histogram("sentiment_request_latency_seconds", "HTTP request latency",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("sentiment_rejected_requests", "Requests refused, by reason "
                                f"({', '.join(REJECTION_REASONS)})", ["reason"], registry=r)
        # each (endpoint, status)'s request counter and latency histogram, looked up once: ``labels`` takes a lock
        # and builds its key on every call (both labels are bounded: the endpoints served, the statuses answered)
        self._request_series: dict[tuple[str, int], tuple[Counter, Histogram]] = {}

        # batching and inference
        self.queue_depth = Gauge("sentiment_queue_depth", "Texts waiting for the engine", registry=r)
        self.queue_limit = Gauge("sentiment_queue_limit", "Texts the batch queue holds at most (MAX_QUEUE, set or "
                                 "derived from the memory limit); past it requests are refused 503", registry=r)
        self.queue_wait = Histogram("sentiment_queue_wait_seconds", "Time a text waited before its batch ran",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.inference_latency = Histogram("sentiment_inference_latency_seconds", "Engine time per batch, measured "
                                           "on the engine worker around the engine call alone", ["device"],
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.engine_handoff = Histogram("sentiment_engine_handoff_seconds", "Hand-off of a batch between the event "
                                        "loop and an engine worker: to_worker (formed until a worker picks it up), "
                                        "to_loop (the worker done until the loop takes the results; a stalled loop "
                                        "shows here)", ["direction"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("sentiment_batch_size", "Texts per engine batch",
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("sentiment_batch_tokens", "Padded tokens per engine batch",
                                      buckets=BATCH_TOKEN_BUCKETS, registry=r)
        self.padded_tokens = Counter("sentiment_padded_tokens", "Tokens computed by the engine, padding included",
                                     registry=r)
        self.real_tokens = Counter("sentiment_real_tokens", "Tokens of real text computed by the engine",
                                   registry=r)
        self.token_budget = Gauge("sentiment_batch_token_budget", "Current padded-token budget per batch "
                                  "at the model's max length; batches of shorter texts may hold more (lowered under "
                                  "memory pressure or after OOM)", registry=r)

        # cache
        self.cache_hits = Counter("sentiment_cache_hits", "Prediction cache hits", registry=r)
        self.cache_misses = Counter("sentiment_cache_misses", "Prediction cache misses", registry=r)
        self.cache_evictions = Counter("sentiment_cache_evictions", "Entries evicted (size bound or memory shed)",
                                       registry=r)
        self.cache_bytes = Gauge("sentiment_cache_bytes", "Bytes held by the prediction cache", registry=r)
        self.cache_entries = Gauge("sentiment_cache_entries", "Entries in the prediction cache", registry=r)
        self.cache_limit = Gauge("sentiment_cache_limit_bytes", "Configured cache bound in bytes", registry=r)

        # memory and OOM
        self.rss = Gauge("sentiment_process_resident_memory_bytes", "Resident memory of the server process",
                         registry=r)
        self.memory_limit = Gauge("sentiment_memory_limit_bytes",
                                  "Memory limit of the container (cgroup) or the host", registry=r)
        self.memory_pressure = Gauge("sentiment_memory_pressure", "1 while RSS is above the high-water mark",
                                     registry=r)
        self.memory_headroom = Gauge("sentiment_memory_headroom_bytes", "MEMORY_HIGH_WATER x the memory limit minus "
                                     "resident memory: what the process may still take before it sheds (negative "
                                     "while it does)", registry=r)
        self.memory_plan = Gauge("sentiment_memory_plan_bytes", "The memory plan's peak, by part (base, cache, queue, "
                                 "batches) and memory (host, gpu); see server/budget.py", ["memory", "part"],
                                 registry=r)
        self.memory_cost_per_token = Gauge("sentiment_memory_cost_bytes_per_token", "Cost model, linear term: peak "
                                           "bytes of a batch per padded token", registry=r)
        self.memory_cost_per_token_length = Gauge("sentiment_memory_cost_bytes_per_token_length", "Cost model, "
                                                  "quadratic term: peak bytes per padded token per token of sequence "
                                                  "length (attention)", registry=r)
        self.oom_events = Counter("sentiment_oom_events", "Out-of-memory errors from the engine", ["device"],
                                  registry=r)
        self.batch_splits = Counter("sentiment_batch_splits", "Batches split in two after an OOM", ["device"],
                                    registry=r)
        self.cpu_fallbacks = Counter("sentiment_cpu_fallbacks", "Texts run on the CPU after GPU OOM", registry=r)
        self.inference_errors = Counter("sentiment_inference_errors", "Engine failures, by batch (503 inference_failed;"
                                        " 500 model_output_invalid: NaN or infinite scores)", ["device"], registry=r)
        self.gpu_memory_used = Gauge("sentiment_gpu_memory_used_bytes", "GPU memory in use (NVML)", ["gpu"],
                                     registry=r)
        self.gpu_memory_total = Gauge("sentiment_gpu_memory_total_bytes", "GPU memory in total (NVML)", ["gpu"],
                                      registry=r)
        self.gpu_utilization = Gauge("sentiment_gpu_utilization_ratio", "GPU busy fraction (NVML)", ["gpu"],
                                     registry=r)

        # model
        self.model_info = Gauge("sentiment_model_info", "The model serving (value 1)",
                                ["name", "version", "variant", "provider", "device"], registry=r)
        self.ready = Gauge("sentiment_ready", "1 when the model is loaded and warm and not draining", registry=r)
        self.predictions = Counter("sentiment_predictions", "Predictions by model and label",
                                   ["model", "version", "label"], registry=r)
        self.confidence = Histogram("sentiment_prediction_confidence", "Probability of the predicted label",
                                    ["model", "version"], buckets=CONFIDENCE_BUCKETS, registry=r)
        self.low_confidence = Counter("sentiment_low_confidence_predictions",
                                      "Predictions whose score is below the model's low-confidence threshold "
                                      "(LOW_CONFIDENCE_THRESHOLD scaled to its number of labels; drift signal)",
                                      ["model", "version"], registry=r)
        self.truncated = Counter("sentiment_truncated_texts", "Texts longer than the model's max_sequence_length, "
                                 "of which only the first tokens were read", ["model", "version"], registry=r)
        self.model_reloads = Counter("sentiment_model_reloads", "Model reload attempts by result", ["result"],
                                     registry=r)

        # store
        self.store_up = Gauge("sentiment_store_up", "1 when the prediction database accepts writes", registry=r)
        self.store_queue_depth = Gauge("sentiment_store_queue_depth", "Records waiting to be written", registry=r)
        self.store_spool_rows = Gauge("sentiment_store_spool_rows", "Records spooled to disk awaiting replay",
                                      registry=r)
        self.store_foreign_spool_rows = Gauge(
            "sentiment_store_foreign_spool_rows", "Records in spools set aside for another database (DATABASE_URL "
            "changed): in no database until `sentiment-analyzer spool replay` of each (/health: foreign_spools)",
            registry=r)
        self.store_written = Counter("sentiment_store_written_rows", "Records written to the database", registry=r)
        self.store_write_errors = Counter("sentiment_store_write_errors", "Failed database writes", registry=r)
        self.store_lost = Counter("sentiment_store_lost_records", "Records of answered predictions dropped, in no "
                                  "database and no spool (the memory queue full while the spool cannot take them) "
                                  "(/health: lost_rows)", registry=r)
        self.store_replayed = Counter("sentiment_store_replayed_rows", "Spooled records replayed into the database",
                                      registry=r)
        self.store_rejected = Counter("sentiment_store_rejected_rows", "Records the database refused for their "
                                      "content, kept in SPOOL_DIR/rejected.jsonl for `sentiment-analyzer spool "
                                      "replay-rejected`", registry=r)
        self.store_replaying = Gauge("sentiment_store_replaying", "1 while spooled records are being replayed",
                                     registry=r)
        self.store_spool_bytes = Gauge("sentiment_store_spool_bytes", "Bytes of the spool file on disk", registry=r)
        self.store_spool_lost_bytes = Gauge(
            "sentiment_store_spool_lost_bytes", "Bytes of acknowledged records found missing from the spool at start "
            "(a segment cut short or removed on disk): lost, not replayed (/health: spool_damage)", registry=r)
        self.store_spool_limit = Gauge("sentiment_store_spool_limit_bytes", "SPOOL_MAX_BYTES", registry=r)
        self.store_call_age = Gauge("sentiment_store_database_call_seconds", "How long the store's database call "
                                    "under way has run (0 when none): a lock or a stalled database holds one until "
                                    "its timeout", registry=r)
        self.store_ack_latency = Histogram("sentiment_store_ack_seconds", "Wait for a request's records to be "
                                           "fsynced before its answer (STORE_DURABILITY=ack)",
                                           buckets=LATENCY_BUCKETS, registry=r)

        # connections and auth
        self.open_connections = Gauge("sentiment_open_connections", "Client connections open now", registry=r)
        self.key_cache_fallbacks = Counter("sentiment_auth_key_cache_fallbacks", "Requests authorised from the "
                                           "in-process key cache because the database was unavailable", registry=r)

        # logs
        r.register(LostLogLines())

        self._serving: tuple[str, str, tuple[str, ...]] | None = None  # (model, version, labels): serving_model
        self._retired: tuple[str, str, tuple[str, ...]] | None = None  # the model served before it
        self._create_known_children()

    def _create_known_children(self) -> None:
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason)
        for device in DEVICES:
            for family in (self.oom_events, self.batch_splits, self.inference_errors):
                family.labels(device)
        for result in RELOAD_RESULTS:
            self.model_reloads.labels(result)
        for direction in HANDOFF_DIRECTIONS:
            self.engine_handoff.labels(direction)
        for endpoint in PREDICTION_ENDPOINTS:
            for status in PREDICTION_STATUSES:
                self.requests.labels(endpoint, status)

    def count_request(self, endpoint: str, status: int, seconds: float) -> None:
        """One request answered (HTTP or gRPC): counted by endpoint and status, its latency observed."""
        series = self._request_series.get((endpoint, status))
        if series is None:
            series = self._request_series[endpoint, status] = (self.requests.labels(endpoint, str(status)),
                                                               self.request_latency.labels(endpoint))
        series[0].inc()
        series[1].observe(seconds)

    def serving_model(self, name: str, version: str, labels: list[str]) -> None:
        """The model now serving: its series of the model families start at 0; the previous model's are kept until
        the next swap, and the one's before them removed.

        Called whenever a model starts serving, so ``sentiment_predictions_total`` holds one series per label of
        the model in use and of the one before it (bounded by two manifests), and a model's first prediction of a
        label shows as an increase. The previous model's series stay so that what it counted since the last
        scrape, and the batches it still finishes after the swap, reach Prometheus: removed at the swap, those
        counts were lost. They stop growing, so a rate over them falls to 0. The same model reloaded (same name
        and version) keeps its counts.
        """
        serving = (name, version, tuple(labels))
        if serving == self._serving:
            return
        if self._retired is not None and self._retired != serving:
            old_name, old_version, old_labels = self._retired
            for label in old_labels:
                self.predictions.remove(old_name, old_version, label)
            for family in (self.confidence, self.low_confidence, self.truncated):
                family.remove(old_name, old_version)
        for label in labels:
            self.predictions.labels(name, version, label)
        for family in (self.confidence, self.low_confidence, self.truncated):
            family.labels(name, version)
        self._retired, self._serving = self._serving, serving

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LostLogLines(Collector):
    """``sentiment_log_lines_lost_total{reason}``: the log lines the process could not write (``queue_full``: its
    output stalled; ``unwritable``: its output refused them), read from the log writer at each scrape. The log
    says so too, but the log is what lost them."""

    def collect(self):
        family = CounterMetricFamily("sentiment_log_lines_lost", "Log lines not written: queue_full (the output "
                                     "stalled and the writer's queue was full), unwritable (the output refused "
                                     "them: a full disk, a closed pipe)", labels=["reason"])
        for reason, count in lost_log_lines().items():
            family.add_metric([reason], count)
        yield family
