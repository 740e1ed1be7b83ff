"""What a running server holds: the served models, settings, limiter, price table and Prometheus metrics."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmasos.server.ledger import Ledger
from llmasos.server.metering import Limiter, PriceTable


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 4 << 20
    max_queue: int = 512  # waiting sequences per model before 503
    max_prompts_per_request: int = 128  # prompts in one completions request
    max_sequences_per_request: int = 256  # prompts x n in one request
    max_sequences_per_key: int | None = 256  # a key's fair share: sequences it may hold at once (None: no cap)
    shutdown_timeout: float = 30.0
    allow_unauthenticated: bool = False
    price_table: PriceTable = field(default_factory=PriceTable)
    allowed_hosts: tuple[str, ...] = ()  # Host names a keyless server answers besides loopback ones; "*": any
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call the API (CORS); "*": any
    timeout_keep_alive: float = 5.0  # seconds an idle connection is kept between requests
    header_timeout: float = 10.0  # seconds from a request's first byte (or the connection) to its last header
    body_timeout: float = 60.0  # seconds from the last header to the last byte of the body
    max_connections_per_client: int = 64  # open connections per client address; 0: no cap
    log_format: str = "text"  # access and server log lines: "text" or "json" (one object a line)
    tool_call_parser: str | None = None  # hermes, llama3_json, mistral; None: chosen from each model's chat template
    lora_dirs: tuple[str, ...] = ()  # directories POST /v1/load_lora_adapter may read adapters from

    def __post_init__(self) -> None:
        self.allowed_hosts, self.cors_origins = tuple(self.allowed_hosts), tuple(self.cors_origins)
        self.lora_dirs = tuple(str(d) for d in self.lora_dirs)
        for name in ("timeout_keep_alive", "header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {getattr(self, name)!r}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be 'text' or 'json', not {self.log_format!r}")
        if self.max_connections_per_client < 0:
            raise ValueError("max_connections_per_client must be 0 (no cap) or more, not "
                             f"{self.max_connections_per_client}")


@dataclass
class ServedModel:
    """One model behind the API: its engine front and its resolved spec (system prompt, template, defaults)."""

    id: str
    llm: Any  # llmasos.LLM
    async_llm: Any  # llmasos.engine.async_llm.AsyncLLM
    spec: Any = None  # llmasos.spec.ModelSpec
    created: int = field(default_factory=lambda: int(time.time()))
    # "embed": an encoder on /v1/embeddings, llm and async_llm an EmbeddingService; "classify": a sequence classifier
    # on /classify (and /v1/score, /v1/rerank), llm and async_llm a ClassifierService; "seq2seq": an encoder-decoder
    # (T5) on /v1/completions (and chat, given a template), llm and async_llm a Seq2SeqService
    task: str = "generate"

    @property
    def path(self) -> Path | None:
        return self.spec.directory if self.spec is not None else None

    @property
    def system_prompt(self) -> str | None:
        return self.spec.system if self.spec is not None else None

    @property
    def chat_template(self) -> str | None:
        return self.spec.template if self.spec is not None else None

    @property
    def max_model_len(self) -> int:
        return self.llm.max_model_len if self.task != "generate" else self.llm.engine.max_model_len

    @property
    def num_parameters(self) -> int:
        if self.task == "generate":
            return self.llm.num_parameters
        model = self.llm.model
        if hasattr(model, "num_parameters"):  # an encoder's own count
            return model.num_parameters()
        return sum(p.numel() for p in model.parameters())


class ServerMetrics:
    """Prometheus metrics in a registry of the app's own (several apps can live in one test process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llmasos_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("llmasos_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("llmasos_generation_tokens", "Tokens generated", ["model"], registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("llmasos_time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=buckets, registry=r)
        self.itl = Histogram("llmasos_inter_token_latency_seconds", "Time between streamed tokens", ["model"],
                             buckets=buckets, registry=r)
        self.running = Gauge("llmasos_num_requests_running", "Requests in the running batch", ["model"], registry=r)
        self.waiting = Gauge("llmasos_num_requests_waiting", "Requests waiting for the batch", ["model"], registry=r)
        self.kv_usage = Gauge("llmasos_kv_cache_usage_ratio", "Share of KV blocks in use", ["model"], registry=r)
        self.preemptions = Gauge("llmasos_num_preemptions", "Preemptions since start", ["model"], registry=r)
        self.prefix_hit_rate = Gauge("llmasos_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache",
                                     ["model"], registry=r)
        self.weight_bytes = Gauge("llmasos_model_weight_bytes", "Bytes of the model's weights in memory", ["model"],
                                  registry=r)
        self.kv_cache_bytes = Gauge("llmasos_kv_cache_bytes", "Bytes allocated to the model's KV cache", ["model"],
                                    registry=r)
        self.rss_bytes = Gauge("llmasos_engine_resident_bytes", "Resident memory of the process running the engine",
                               ["model"], registry=r)
        self.engine_threads = Gauge("llmasos_engine_threads", "Torch threads the engine computes with", ["model"],
                                    registry=r)
        self.structured_requests = Counter("llmasos_structured_output_requests",
                                           "Requests whose output is constrained (JSON schema, regex, choice, grammar, "
                                           "forced tool calls)", ["model", "kind"], registry=r)
        self.structured_compile = Histogram("llmasos_structured_output_compile_seconds",
                                            "Time to check and compile a request's constraint (cached ones: ~0)",
                                            ["model"], buckets=buckets, registry=r)
        self.engine_restarts = Gauge("llmasos_engine_restarts", "Engine process restarts after a crash", ["model"],
                                     registry=r)

    def refresh(self, models: dict[str, ServedModel]) -> None:
        """Set the per-model gauges of the models loaded now; an unloaded model's series disappear."""
        for gauge in (self.weight_bytes, self.kv_cache_bytes, self.rss_bytes, self.engine_threads, self.engine_restarts,
                      self.running, self.waiting, self.kv_usage, self.preemptions, self.prefix_hit_rate):
            gauge.clear()
        for model_id, served in models.items():
            if served.task != "generate":
                continue
            stats = served.llm.metrics()  # the counters the engine last reported: never waits for a step
            self.weight_bytes.labels(model_id).set(stats["weight_bytes"])
            self.kv_cache_bytes.labels(model_id).set(stats["kv_cache_bytes"])
            self.rss_bytes.labels(model_id).set(stats["rss_bytes"])
            self.engine_threads.labels(model_id).set(stats["num_threads"])
            self.engine_restarts.labels(model_id).set(len(served.async_llm.restarts))
            self.running.labels(model_id).set(stats["num_running"])
            self.waiting.labels(model_id).set(stats["num_waiting"])
            self.kv_usage.labels(model_id).set(stats["kv_cache_usage"])
            self.preemptions.labels(model_id).set(stats["num_preemptions"])
            self.prefix_hit_rate.labels(model_id).set(stats["prefix_cache_hit_rate"])


@dataclass
class ServerState:
    models: Any  # llmasos.server.lifecycle.ModelManager: what is servable, what is loaded, and the leases
    settings: ServerSettings
    limiter: Limiter = field(default_factory=Limiter)
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    _auth_cache: tuple[float, bool] = (0.0, False)
    # Which server answered (GET /health's x-llmasos-instance header): an in-process Service checks it is its own.
    instance_id: str = field(default_factory=lambda: secrets.token_hex(8))
    # A bearer token known only to this process: an in-process Service's own calls (LLMServing's predict) pass auth
    # with it and are metered without a key name; it is never printed, stored or sent anywhere but to ourselves.
    internal_token: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    ledger: Ledger | None = None  # the metering writer (made with the state: it releases admissions to the limiter)

    def __post_init__(self) -> None:
        if self.ledger is None:
            self.ledger = Ledger(on_released=self.limiter.forget)

    def auth_required(self) -> bool:
        """True once any key has been created. Revoked and expired keys count too: revoking the last key must lock
        the server, not open it. Keys are never deleted, so True is final; False is re-checked at most once a
        second (a key created while the server runs takes effect within a second)."""
        from llmasos.server.auth import key_count

        checked_at, required = self._auth_cache
        now = time.monotonic()
        if not required and now - checked_at > 1.0:
            required = key_count() > 0
            self._auth_cache = (now, required)
        return required
