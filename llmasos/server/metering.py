"""Pricing and per-key limits: a price table ($ per 1M tokens, growing with model size by default), and an admission
controller enforcing requests/tokens per minute, concurrent requests and the token quota, with OpenAI's headers.

The limits live in the database (`limits_store`), so servers sharing one database enforce them together; only the
fair share of one server (`max_sequences_per_key`) is counted per process. An admission opens the request's usage
row in the metering ledger (`ledger_store`); when the database cannot be read or written, admission fails closed
(a 503), so nothing is served unbilled."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from llmasos.server import ledger_store, limits_store
from llmasos.server.auth import KeyInfo
from llmasos.server.ledger_store import Entry
from llmasos.server.limits_store import WINDOW_SECONDS, Window
from llmasos.server.protocol import APIError

log = logging.getLogger(__name__)
# How long a request's reservation outlives its server: a live server renews it every third of this, so a crashed
# server's reservations (concurrency, quota) are released this many seconds after its last renewal at the latest.
DEFAULT_LEASE_SECONDS = 30.0


@dataclass(frozen=True)
class Price:
    input: float  # dollars per 1M prompt tokens
    output: float  # dollars per 1M completion tokens


def default_price(num_parameters: int) -> Price:
    """$0.05 per 1M input tokens plus $0.20 per billion parameters; output costs twice as much."""
    billions = num_parameters / 1e9
    input_price = round(0.05 + 0.20 * billions, 6)
    return Price(input_price, round(2 * input_price, 6))


class PriceTable:
    def __init__(self, overrides: dict[str, Price] | None = None) -> None:
        self.overrides = dict(overrides or {})

    @classmethod
    def from_file(cls, path: str | Path) -> PriceTable:
        """A JSON file {"model-id": {"input": 0.5, "output": 1.5}, ...} in dollars per 1M tokens."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            prices = {model: Price(float(p["input"]), float(p["output"])) for model, p in data.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"price table {path} is invalid ({exc}); expected "
                             '{"model": {"input": <$ per 1M>, "output": <$ per 1M>}}') from None
        return cls(prices)

    def price(self, model: str, num_parameters: int, base: str | None = None) -> Price:
        """The model's own price, else (a LoRA adapter) its base's, else the default for its size."""
        return self.overrides.get(model) or (self.overrides.get(base) if base else None) or \
            default_price(num_parameters)

    def cost(self, model: str, num_parameters: int, prompt_tokens: int, completion_tokens: int,
             base: str | None = None) -> float:
        price = self.price(model, num_parameters, base)
        return (prompt_tokens * price.input + completion_tokens * price.output) / 1e6


@dataclass
class Admission:
    key: KeyInfo | None
    max_completion_tokens: int | None  # what the quota still allows, None = unlimited
    reserved: int = 0
    released: bool = False
    sequences: int = 1
    admission_id: int | None = None  # its row in the database's `admissions`


def metering_unavailable(exc: BaseException) -> APIError:
    """Fail closed: a request that cannot be metered is refused (503, Retry-After), never served unbilled."""
    text = str(exc).lower()
    reason = "it is locked by another writer" if "lock" in text else \
        "its disk is full" if "full" in text or "no space" in text else "it does not answer"
    log.warning("refusing a metered request: the metering database failed (%s)", str(exc).splitlines()[0][:200])
    return APIError(503, f"the metering database is unavailable ({reason}): this server refuses metered requests "
                    "until it answers again; retry shortly", type="service_unavailable",
                    code="metering_unavailable", headers={"Retry-After": "5"})


def lease_seconds() -> float:
    value = os.environ.get("LLMASOS_RESERVATION_LEASE", "")
    try:
        return float(value) if value else DEFAULT_LEASE_SECONDS
    except ValueError:
        raise ValueError(f"LLMASOS_RESERVATION_LEASE={value!r} is not a number of seconds") from None


class Limiter:
    """Admission by per-key limits shared through the database. `admit` and `release` block (database): call them
    from a worker thread. `headers` never touches the database: it answers from the window the last admission of the
    key saw on this server."""

    def __init__(self, lease: float | None = None) -> None:
        self.lease = lease if lease is not None else lease_seconds()
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, Window]] = {}  # key -> (monotonic time, window after its last admission)
        self._local: dict[str, int] = {}  # key -> sequences in flight on this server (its fair share)
        self._live: set[int] = set()  # admission ids running here, whose leases the renewer extends
        self._renewer: threading.Thread | None = None

    def headers(self, key: KeyInfo | None) -> dict[str, str]:
        if key is None:
            return {}
        with self._lock:
            seen = self._seen.get(key.name)
        if seen is None:
            return {}
        at, window = seen
        return self._headers(key, window, time.monotonic() - at)

    @staticmethod
    def _headers(key: KeyInfo, window: Window, elapsed: float = 0.0) -> dict[str, str]:
        out: dict[str, str] = {}
        if key.rpm:
            out["x-ratelimit-limit-requests"] = str(key.rpm)
            out["x-ratelimit-remaining-requests"] = str(max(0, key.rpm - window.requests))
            age = window.oldest_request_age
            reset = WINDOW_SECONDS - age - elapsed if age is not None else 0.0
            out["x-ratelimit-reset-requests"] = f"{max(0.0, reset):.3f}s"
        if key.tpm:
            out["x-ratelimit-limit-tokens"] = str(key.tpm)
            out["x-ratelimit-remaining-tokens"] = str(max(0, key.tpm - window.tokens))
            age = window.oldest_tokens_age
            reset = WINDOW_SECONDS - age - elapsed if age is not None else 0.0
            out["x-ratelimit-reset-tokens"] = f"{max(0.0, reset):.3f}s"
        if key.max_concurrency:
            out["x-ratelimit-limit-concurrent-requests"] = str(key.max_concurrency)
            out["x-ratelimit-remaining-concurrent-requests"] = str(max(0, key.max_concurrency - window.in_flight))
        return out

    def _reject(self, key: KeyInfo, window: Window, message: str, retry_after: float,
                code: str = "rate_limit_exceeded", type: str = "rate_limit_error",
                extra: dict[str, str] | None = None) -> APIError:
        headers = {"Retry-After": str(max(1, math.ceil(retry_after))), **self._headers(key, window), **(extra or {})}
        return APIError(429, message, type=type, code=code, headers=headers)

    def admit(self, key: KeyInfo | None, prompt_tokens: int, max_tokens: int, sequences: int = 1,
              max_sequences_per_key: int | None = None, entry: Entry | None = None) -> Admission:
        """Admit a request of `sequences` sequences (prompts x n) or raise a 429 APIError. rpm counts requests;
        concurrency and the key's fair share (`max_sequences_per_key`) count sequences. Caps generation at what the
        key's quota still allows. `entry`: the request's usage entry, whose row (prompt tokens billed) is written in
        the admission's transaction. Fails closed: a 503 when the database cannot be read or written. Thread-safe;
        blocking (one database transaction)."""
        if key is None:
            return Admission(None, None, sequences=sequences)
        if key.max_concurrency and sequences > key.max_concurrency:
            raise APIError(400, f"the request asks for {sequences} sequences (prompts x n) but key {key.name!r} "
                           f"allows {key.max_concurrency} at once; split it", param="n")
        with self._lock:  # this server's fair share: taken first, given back if the database refuses
            local = self._local.get(key.name, 0)
            if max_sequences_per_key and local + sequences > max_sequences_per_key:
                raise APIError(429, f"key {key.name!r} already holds {local} sequences, its fair share of this "
                               f"server ({max_sequences_per_key}); retry when some finish", type="rate_limit_error",
                               code="rate_limit_exceeded", headers={"Retry-After": "1"})
            self._local[key.name] = local + sequences
        decided: list = [None, 0]  # (completion tokens the quota allows, tokens reserved), as the database decided

        def decide(window: Window) -> tuple[int, int]:
            decided[:] = self._decide(key, window, prompt_tokens, max_tokens, sequences)
            if entry is not None:  # its prompt is billed in this transaction: it counts as used, not reserved
                return sequences, max(0, decided[1] - entry.prompt_tokens)
            return sequences, decided[1]

        def opened(db, admission_id: int) -> None:
            entry.admission_id = admission_id
            ledger_store.open_entry(db, entry)

        try:
            admission_id, window = limits_store.admit(
                key.name, decide, self.lease, opened if entry is not None else None,
                billed=entry.prompt_tokens + entry.completion_tokens if entry is not None else 0)
        except SQLAlchemyError as exc:
            self._give_back(key.name, sequences)
            if entry is not None:
                entry.admission_id = None
            raise metering_unavailable(exc) from None
        except BaseException:
            self._give_back(key.name, sequences)
            if entry is not None:
                entry.admission_id = None
            raise
        allowed, reserve = decided
        admission = Admission(key, allowed, reserve, sequences=sequences, admission_id=admission_id)
        with self._lock:
            after = replace(window, requests=window.requests + 1, in_flight=window.in_flight + sequences,
                            reserved=window.reserved + reserve,
                            oldest_request_age=window.oldest_request_age if window.requests else 0.0)
            self._seen[key.name] = (time.monotonic(), after)
            self._live.add(admission_id)
            self._start_renewer()
        return admission

    def _decide(self, key: KeyInfo, window: Window, prompt_tokens: int, max_tokens: int,
                sequences: int) -> tuple[int | None, int]:
        """(completion tokens the quota still allows or None, tokens to reserve), or a 429 APIError."""
        if key.rpm and window.requests >= key.rpm:
            raise self._reject(key, window, f"rate limit reached: {key.rpm} requests per minute for key {key.name!r}",
                               WINDOW_SECONDS - (window.oldest_request_age or 0.0))
        if key.tpm and window.tokens + prompt_tokens > key.tpm:
            age = window.oldest_tokens_age
            raise self._reject(key, window, f"rate limit reached: {key.tpm} tokens per minute for key {key.name!r}",
                               WINDOW_SECONDS - age if age is not None else WINDOW_SECONDS)
        if key.max_concurrency and window.in_flight + sequences > key.max_concurrency:
            raise self._reject(key, window, f"too many concurrent requests: key {key.name!r} allows "
                               f"{key.max_concurrency} sequences at once ({window.in_flight} running)", 1)
        if key.token_quota is None:
            return None, 0
        remaining = key.token_quota - window.used_tokens - window.reserved
        if remaining - prompt_tokens <= 0:
            raise self._reject(key, window, f"key {key.name!r} has used its token quota of {key.token_quota}; ask for "
                               "a larger quota or a new key", 3600, code="insufficient_quota",
                               type="insufficient_quota",
                               extra={"x-ratelimit-limit-quota-tokens": str(key.token_quota),
                                      "x-ratelimit-remaining-quota-tokens": str(max(0, remaining))})
        allowed = remaining - prompt_tokens
        return allowed, prompt_tokens + min(max_tokens, allowed)

    def _give_back(self, key_name: str, sequences: int) -> None:
        with self._lock:
            self._local[key_name] = self._local.get(key_name, 0) - sequences
            if self._local[key_name] <= 0:
                del self._local[key_name]

    def release(self, admission: Admission, total_tokens: int) -> None:
        """Free the request's reservation and count its tokens in the tpm window. Blocking (database); a failure is
        logged, not raised: the reservation then lapses with its lease."""
        if admission.key is None or admission.released:
            return
        self.release_here(admission, total_tokens)
        self.forget(admission.admission_id)
        try:
            limits_store.release(admission.admission_id, admission.key.name, total_tokens)
        except Exception:
            log.exception("could not release admission %s of key %r; it lapses in %.0f s", admission.admission_id,
                          admission.key.name, self.lease)

    def forget(self, admission_id: int | None) -> None:
        """Stop renewing the admission's lease: its release reached the database (the ledger's final write)."""
        with self._lock:
            self._live.discard(admission_id)

    def release_here(self, admission: Admission, total_tokens: int) -> None:
        """This server's side of a release (its fair share, the headers' window), memory only: the ledger's final
        write releases the admission in the database, and the lease is renewed until it has (`forget`)."""
        if admission.key is None or admission.released:
            return
        admission.released = True
        self._give_back(admission.key.name, admission.sequences)
        with self._lock:
            seen = self._seen.get(admission.key.name)
            if seen is not None:
                at, window = seen
                self._seen[admission.key.name] = (at, replace(
                    window, in_flight=max(0, window.in_flight - admission.sequences),
                    reserved=max(0, window.reserved - admission.reserved), tokens=window.tokens + total_tokens))

    def _start_renewer(self) -> None:
        if self._renewer is None or not self._renewer.is_alive():
            self._renewer = threading.Thread(target=self._renew_forever, name="llmasos-lease-renewer", daemon=True)
            self._renewer.start()

    def _renew_forever(self) -> None:
        """Renew this server's running requests until none is left (the next admission starts a new renewer)."""
        while True:
            time.sleep(self.lease / 3)
            with self._lock:
                live = sorted(self._live)
                if not live:
                    self._renewer = None
                    return
            try:
                limits_store.renew(live, self.lease)
            except Exception:
                log.exception("could not renew the leases of %d running requests", len(live))
