"""All settings in one place, read once from the environment (and CLI flags).

Every other module receives a ``Settings`` object; nothing else reads the
environment. An invalid value stops start-up with one line naming the
variable, the value and what is allowed (``ConfigError``); so do values that
do not fit together (``check_relationships``) and non-finite numbers.
What settings cannot say about the machine (paths, DATABASE_URL's dialect,
the model itself) is checked by ``server.preflight``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_PATH = PROJECT_ROOT / "models" / "default"
MAX_DURATION_S = 86_400.0  # the longest timeout, wait or interval a setting may give
MAX_INTEGER = 2**53  # the largest integer setting: /health and /info show them as JSON numbers, exact below this


class ConfigError(ValueError):
    """A setting has a value the server cannot run with."""


class Settings(BaseSettings):
    # allow_inf_nan=False: "inf" or "nan" parse as floats, and an infinite timeout or water mark is never meant.
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", frozen=True,
                                      allow_inf_nan=False)

    # model and runtime
    model_path: Path = Field(DEFAULT_MODEL_PATH, description="model artifact directory")
    model_variant: Literal["auto", "fp32", "int8", "fp16"] = Field(
        "auto", description="artifact variant; auto = fp16 on CUDA, int8 on CPU when present, else fp32"
    )
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto uses CUDA when usable, else CPU")
    cuda_device_id: int = Field(0, ge=0, description="CUDA device ordinal")
    cuda_mem_limit: int = Field(0, ge=0, description="ONNX Runtime CUDA arena limit in bytes (0 = no limit)")
    intra_op_threads: int = Field(
        0, ge=0, le=256, description="CPU threads per inference (0 = auto: the cores available shared among "
        "ENGINE_WORKERS); more than the cores is warned of at start"
    )
    intra_op_spinning: bool = Field(
        False, description="let ONNX Runtime's CPU threads busy-wait between operators (burns the cores the server's "
        "own event loop needs; worth it only when cores are otherwise idle)"
    )
    idle_spin_ms: int = Field(
        0, ge=0, le=1000, description="keep the CPUs busy this many ms after each batch (server/idle_spin.py), so "
        "a lone client's next request finds them awake: on a VM without a polling idle driver, up to ~0.6 ms off a "
        "lone request (README); spends the idle cycles meanwhile; refused under a CPU quota (0 = off)"
    )
    engine_workers: int = Field(
        0, ge=0, le=64,
        description="batches the engine runs at once, each on its own thread "
        "(0 = auto: 2 on a CPU with 2+ cores, 1 on CUDA)",
    )
    arena_shrink_tokens: int = Field(
        2048, ge=0, description="give the memory arena back after batches above this many padded tokens (0 = never)"
    )
    strict_truncation: bool = Field(False, description="reject (422) texts longer than the model's max length")
    warmup: bool = Field(True, description="run every batch shape bucket once before reporting ready")
    reload_timeout_s: float = Field(600.0, gt=0, description="longest a hot reload may take to load, verify, warm "
                                    "and smoke-test its model; past it the reload answers 409, and later reloads "
                                    "are refused at once until that load ends (its thread cannot be stopped)")

    # HTTP
    host: str = Field("0.0.0.0", min_length=1, description="bind address")
    port: int = Field(8000, ge=1, le=65535, description="bind port")
    grpc_port: int = Field(0, ge=0, le=65535, description="Open Inference Protocol v2 gRPC port on HOST (0 = no "
                           "gRPC server)")
    grpc_max_connection_age_s: float = Field(60.0, gt=0, description="a gRPC connection this old is asked to go "
                                             "(GOAWAY: clients reconnect) and closed REQUEST_TIMEOUT_S later, its "
                                             "calls finished or not")
    max_request_bytes: int = Field(1_048_576, ge=1024, le=2**31 - 1, description="largest accepted request body "
                                   "(413 beyond); at most 2 GiB - 1, gRPC's limit on a message")
    max_texts_per_request: int = Field(256, ge=1, description="largest 'texts' list accepted")
    max_text_chars: int = Field(20_000, ge=1, description="longest single text accepted (413 beyond)")
    request_timeout_s: float = Field(30.0, gt=0, description="per-request deadline inside the server (the body must "
                                     "also arrive within it, else 408)")
    header_timeout_s: float = Field(10.0, gt=0, description="a client must send its request headers within this many "
                                    "seconds of connecting (or of its previous request), else 408 and the connection "
                                    "is closed")
    max_connections: int = Field(1024, ge=1, description="open client connections at most; beyond it new "
                                 "connections get 503 + Retry-After and are closed")
    drain_grace_s: float = Field(3.0, ge=0, description="after SIGTERM, keep the listener open this long so /ready "
                                 "answers 503 while load balancers notice")
    drain_timeout_s: float = Field(20.0, gt=0, description="after SIGTERM, longest wait for accepted requests to be "
                                   "answered before the rest are abandoned (and logged)")

    # batching
    max_batch_size: int = Field(32, ge=1, le=4096, description="texts per engine call")
    max_batch_tokens: int = Field(8192, ge=1, description="padded tokens per engine call")
    max_wait_ms: float = Field(2.0, ge=0, description="longest wait to fill a batch under load")
    max_queue: int = Field(2048, ge=1, description="texts waiting for the engine before 503 + Retry-After")

    # cache and memory
    enable_model_caching: bool = Field(True, description="cache predictions by (model version, text)")
    cache_scope: Literal["key", "shared"] = Field(
        "key", description="key: a text's cached prediction serves only requests made with the same API key (or "
        "with none), so that no key can tell from a cache hit, the timing headers or a shared computation that "
        "another key sent that text; shared: one cache for every caller (more hits, for a single tenant)")
    cache_max_bytes: int = Field(64 * 1024 * 1024, ge=0, description="prediction cache bound in bytes (0 disables)")
    memory_high_water: float = Field(0.85, gt=0, le=1, description="RSS/limit ratio where the cache sheds")
    memory_low_water: float = Field(0.75, gt=0, le=1, description="RSS/limit ratio where shedding stops")
    low_confidence_threshold: float = Field(
        0.6, ge=0.5, le=1, description="score below which a prediction counts as low-confidence"
    )

    # store and auth
    database_url: str = Field("sqlite:///./predictions.db", description="SQLAlchemy URL of the prediction store")
    db_pool_size: int = Field(5, ge=1, description="connection pool size (PostgreSQL)")
    db_pool_timeout_s: float = Field(5.0, gt=0, description="wait for a pooled connection")
    db_auto_migrate: bool = Field(False, description="apply pending migrations on PostgreSQL at start")
    store_predictions: bool = Field(True, description="record every prediction in the store")
    store_text: bool = Field(True, description="store the text itself (false: only its sha256)")
    spool_dir: Path = Field(Path("./spool"), description="where records wait while the database is down")
    store_durability: Literal["ack", "async"] = Field(
        "ack", description="ack: a prediction's record is fsynced to the local spool before its 200 is sent; "
        "async: recorded in the background (a crash can lose the last ~0.25 s of records)")
    spool_max_bytes: int = Field(1 << 30, ge=1 << 20, description="cap on the spool's size on disk; when full, "
                                 "ack mode answers /predict with 503 + Retry-After instead of serving unrecorded "
                                 "(413 for one request whose records alone are larger)")
    key_cache_ttl_s: float = Field(30.0, gt=0, description="API keys are checked against an in-process cache "
                                   "reloaded every half of this; a revocation made elsewhere takes effect within it, "
                                   "and keys the server has loaded keep working while the database is down")
    auth_mode: Literal["open", "required"] = Field("open", description="required: /predict needs an API key")

    # logging
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field("INFO", description="log level")
    log_format: Literal["json", "text"] = Field("text", description="json for containers, text for humans")
    log_file: Path | None = Field(None, description="also write logs to this file")
    log_max_bytes: int = Field(50 * 1024 * 1024, ge=0, description="rotate LOG_FILE at this size (0 = never)")
    log_backups: int = Field(3, ge=0, le=1000, description="rotated LOG_FILE copies kept")

    @field_validator("*")
    @classmethod
    def _integer_fits_json(cls, value: object) -> object:
        """An integer past 64 bits made /health answer 500 for ever (orjson cannot write it); past 2**53 a
        JavaScript client reads a different number."""
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_INTEGER:
            raise ValueError(f"must be at most 2**53 ({MAX_INTEGER})")
        return value

    @field_validator("request_timeout_s", "header_timeout_s", "grpc_max_connection_age_s", "drain_grace_s",
                     "drain_timeout_s", "db_pool_timeout_s", "key_cache_ttl_s", "max_wait_ms", "reload_timeout_s")
    @classmethod
    def _at_most_a_day(cls, value: float, info: ValidationInfo) -> float:
        """Finite is not enough: a timer beyond threading's TIMEOUT_MAX raises OverflowError where it is used."""
        limit = MAX_DURATION_S * (1000 if info.field_name.endswith("_ms") else 1)
        if value > limit:
            raise ValueError(f"must be at most {limit:g} (one day)")
        return value

    @field_validator("grpc_port")
    @classmethod
    def _not_the_http_port(cls, value: int, info: ValidationInfo) -> int:
        if value and value == info.data.get("port"):
            raise ValueError("must differ from PORT (0 turns gRPC off)")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("model_path", "spool_dir", mode="before")
    @classmethod
    def _not_empty(cls, value: object) -> object:
        """An empty path is the current directory: the spool outside its volume, a model error naming '.'."""
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: unset it for the default, or give a directory")
        return value

    @field_validator("log_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("model_path", "spool_dir", "log_file", mode="before")
    @classmethod
    def _no_surrounding_whitespace(cls, value: object) -> object:
        """A space at either end (an ``--env-file`` slip) named another file: ``SPOOL_DIR="/data/spool "`` made a
        folder ``spool `` beside the one meant, and the records went to a database no one reads (red team
        helper-85). Such names are refused rather than trimmed: which file was meant is the operator's to say.
        DATABASE_URL is checked where it is parsed, whose message hides its password (``server.store.db``)."""
        if isinstance(value, str) and value.strip() and value != value.strip():
            raise ValueError("starts or ends with whitespace, which would name another file: remove it (or quote "
                             "the value without it)")
        return value


def describe_error(error: ValidationError) -> str:
    """One line: the variable, the value it had, and what is allowed."""
    first = error.errors()[0]
    name = str(first["loc"][0]).upper() if first["loc"] else "?"
    value = first.get("input")
    message = first["msg"].removeprefix("Value error, ")
    return f"invalid configuration: {name}={value!r}: {message}"


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit overrides (CLI flags) on top."""
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(describe_error(exc)) from None
    if settings.memory_low_water >= settings.memory_high_water:
        raise ConfigError(
            f"invalid configuration: MEMORY_LOW_WATER={settings.memory_low_water!r}: "
            f"must be below MEMORY_HIGH_WATER={settings.memory_high_water!r}"
        )
    return settings


def check_relationships(settings: Settings) -> None:
    """Settings valid one by one but not together; ``ConfigError`` naming both variables.

    Checked by start-up and ``doctor`` (``server.preflight``), not by ``load_settings``, so that unit tests
    can still build a tiny queue. MAX_WAIT_MS at or past the request deadline would hold texts under load until
    they time out. MAX_QUEUE below MAX_TEXTS_PER_REQUEST would accept a request of more texts
    than the queue can ever hold and answer it 503 + Retry-After forever; the server refuses to start instead
    of splitting such a request (a split request could be half-admitted under load).
    """
    if settings.max_wait_ms >= settings.request_timeout_s * 1000:
        raise ConfigError(
            f"invalid configuration: MAX_WAIT_MS={settings.max_wait_ms!r}: must be below REQUEST_TIMEOUT_S="
            f"{settings.request_timeout_s!r} in milliseconds, or under load a text held to fill a batch would reach "
            "its deadline first; lower MAX_WAIT_MS (a few milliseconds) or raise REQUEST_TIMEOUT_S"
        )
    if "max_queue" in settings.model_fields_set and settings.max_queue < settings.max_texts_per_request:
        # unset, it is derived and never below MAX_TEXTS_PER_REQUEST (``server.budget``): MAX_TEXTS_PER_REQUEST=3000
        # alone was refused for a MAX_QUEUE no one had set (red team helper-85)
        raise ConfigError(
            f"invalid configuration: MAX_QUEUE={settings.max_queue!r}: must be at least "
            f"MAX_TEXTS_PER_REQUEST={settings.max_texts_per_request!r}, or a request of that many texts could "
            "never be queued; raise MAX_QUEUE or lower MAX_TEXTS_PER_REQUEST"
        )
