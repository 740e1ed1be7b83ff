"""Structured output with llguidance: constraints (JSON schema, regex, choice, Lark grammar) become llguidance
grammars, checked in the front end before a request is queued (check_constraint), compiled once per key in the engine
(GrammarCompiler, an LRU of compiled matchers), and turned into packed int32 token bitmasks applied to the logits of
the constrained rows only (fill_bitmask, apply_bitmask). Why llguidance and not xgrammar: docs/performance.md."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path

import llguidance
import numpy as np
import torch

from llmasos.engine.validation import StructuredOutputError, StructuredOutputTimeoutError
from llmasos.sampling_params import StructuredOutputsParams

log = logging.getLogger(__name__)

COMPILE_TIMEOUT_S = 10.0  # a constraint that takes longer than this to check or compile is refused
CACHE_SIZE = 256  # compiled grammars kept per engine (and checked grammars per front end)
# Compact JSON: one space after ',' and ':', no other whitespace. Flexible whitespace lets a weak model pad forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="llmasos-grammar")


def grammar_text(constraint: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON form) for a constraint. Not yet checked."""
    kind, value = constraint.kind, constraint.value
    if kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(value, defaults=JSON_OPTIONS)  # a schema's x-guidance wins
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "choice":  # JSON string literals are Lark string literals
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    return llguidance.LLMatcher.grammar_from_lark(value)


def _describe(constraint: StructuredOutputsParams, message: str) -> str:
    what = {"json": "JSON schema", "json_object": "json_object", "regex": "regex", "choice": "choice",
            "grammar": "grammar"}[constraint.kind]
    lines = []
    for line in message.strip().splitlines():
        if re.match(r"\s*\d+ \| ", line):  # llguidance quotes the generated grammar source: not the user's text
            break
        if line.strip():
            lines.append(line.strip())
    text = " ".join(lines)
    if constraint.kind in ("regex", "choice"):  # positions in a grammar the user never wrote
        text = re.sub(r"^at \d+\(\d+\): ", "", text)
    return f"structured_outputs: invalid {what}: {text}"


def _with_timeout(fn, constraint: StructuredOutputsParams, timeout: float):
    """Run fn in the grammar pool (llguidance drops the GIL while compiling); past `timeout` s, refuse."""
    future = _pool.submit(fn)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        raise StructuredOutputTimeoutError(
            f"structured_outputs: the {constraint.kind} constraint did not compile within {timeout:g} s; "
            "simplify it") from None


def _check(constraint: StructuredOutputsParams) -> str:
    try:
        grammar = grammar_text(constraint)
    except (ValueError, TypeError) as exc:
        raise StructuredOutputError(_describe(constraint, str(exc))) from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise StructuredOutputError(_describe(constraint, messages[0]))
    return grammar


_checked: OrderedDict[str, str] = OrderedDict()  # constraint key -> checked grammar (LRU)
_checked_lock = threading.Lock()


def check_constraint(constraint: StructuredOutputsParams, timeout: float = COMPILE_TIMEOUT_S) -> str:
    """Raise StructuredOutputError if the constraint is invalid or unsupported (a JSON schema keyword llguidance
    does not implement, a bad regex or grammar) or takes over `timeout` s to check; else return its grammar.
    Results are cached by the constraint's key, so a repeated schema costs a dictionary lookup."""
    key = constraint.key()
    with _checked_lock:
        grammar = _checked.get(key)
        if grammar is not None:
            _checked.move_to_end(key)
            return grammar
    grammar = _with_timeout(lambda: _check(constraint), constraint, timeout)
    with _checked_lock:
        _checked[key] = grammar
        while len(_checked) > CACHE_SIZE:
            _checked.popitem(last=False)
    return grammar


def _num_token_ids(tokenizer: dict) -> int:
    """1 + the largest token id a tokenizer.json names (its model's vocab and its added tokens)."""
    vocab = tokenizer.get("model", {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]  # Unigram: a list of pieces
    ids += [token.get("id", 0) for token in tokenizer.get("added_tokens") or []]
    return max(ids, default=-1) + 1


class GrammarCompiler:
    """The engine's half: an llguidance tokenizer for the model's vocabulary (built on first use, in the background:
    ~1 s for 150k tokens) and an LRU of compiled matchers by constraint key; each request gets a copy."""

    def __init__(self, tokenizer_json: str | Path | None, vocab_size: int, eos_token_ids: set[int],
                 cache_size: int = CACHE_SIZE, timeout: float = COMPILE_TIMEOUT_S, mask_threads: int = 1) -> None:
        self.tokenizer_json = tokenizer_json
        self.mask_threads = mask_threads  # llguidance's pool for the rows of one step (chosen, not its 80% of cores)
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.cache_size = cache_size
        self.timeout = timeout
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._loading: concurrent.futures.Future | None = None
        self.tokenizer_seconds = 0.0
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._executor: llguidance.LLExecutor | None = None
        self.num_compiled = 0
        self.compile_seconds = 0.0

    def check_tokenizer(self) -> None:
        """Raise StructuredOutputError now if there is no tokenizer.json to build the llguidance tokenizer from."""
        if self._tokenizer is None and (self.tokenizer_json is None or not Path(self.tokenizer_json).is_file()):
            raise StructuredOutputError("structured_outputs needs the model's tokenizer.json, and this engine has none")

    @property
    def tokenizer_ready(self) -> bool:
        return self._tokenizer is not None

    def load_tokenizer_in_background(self) -> concurrent.futures.Future:
        """Start building the llguidance tokenizer on a thread of its own (0.7-1.2 s for 150k tokens), so the engine
        keeps stepping meanwhile; returns the future (its exception is the StructuredOutputError to report)."""
        with self._lock:
            if self._loading is None:
                self._loading = concurrent.futures.Future()
                threading.Thread(target=self._load, name="llmasos-grammar-tokenizer", daemon=True).start()
            return self._loading

    def _load(self) -> None:
        try:
            self._loading.set_result(self.tokenizer)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
            self._loading.set_exception(exc)

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            self.check_tokenizer()
            started = time.perf_counter()
            try:
                text = Path(self.tokenizer_json).read_text(encoding="utf-8")
                # The bitmask spans the model's rows (padding rows never allowed) or every tokenizer id, if more.
                n_vocab = max(self.vocab_size, _num_token_ids(json.loads(text)))
                tokenizer = llguidance.LLTokenizer(text, n_vocab=n_vocab, eos_token=self.eos_token_ids or None)
            except (OSError, ValueError, RuntimeError, AttributeError, TypeError) as exc:
                raise StructuredOutputError(f"structured_outputs: cannot read this model's tokenizer.json for "
                                            f"constrained decoding: {exc}") from None
            self.tokenizer_seconds = time.perf_counter() - started
            log.info("structured output: llguidance tokenizer for %d tokens built in %.2f s", tokenizer.vocab_size,
                     self.tokenizer_seconds)
            self._tokenizer = tokenizer
        return self._tokenizer

    def matcher(self, constraint: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A fresh matcher for one sequence (raises StructuredOutputError for a constraint that cannot compile)."""
        key = constraint.key()
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
                return compiled.deep_copy()
        grammar = check_constraint(constraint, self.timeout)
        tokenizer = self.tokenizer
        started = time.perf_counter()
        compiled = _with_timeout(lambda: llguidance.LLMatcher(tokenizer, grammar, log_level=0), constraint,
                                 self.timeout)
        if compiled.is_error():
            raise StructuredOutputError(_describe(constraint, compiled.get_error()))
        with self._lock:
            self.num_compiled += 1
            self.compile_seconds += time.perf_counter() - started
            self._compiled[key] = compiled
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return compiled.deep_copy()

    @property
    def bitmask_width(self) -> int:
        return (self.tokenizer.vocab_size + 31) // 32

    def fill_bitmask(self, matchers: list[llguidance.LLMatcher]) -> torch.Tensor:
        """(len(matchers), ceil(vocab / 32)) int32: bit t of row i set where matcher i allows token t. Rows are
        computed in parallel by llguidance's thread pool, outside the GIL."""
        bitmask = torch.empty(len(matchers), self.bitmask_width, dtype=torch.int32)
        if self._executor is None:
            self._executor = llguidance.LLExecutor(self.mask_threads)
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                               self.bitmask_width * 4, len(matchers))
        return bitmask


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Set logits[rows[i], t] to -inf where bit t of bitmask[i] is clear (in place). Tokens past the bitmask's
    width (model vocab padding the tokenizer does not have) are never allowed. One branch-free pass (torch.where)
    over the constrained rows; all rows constrained (the common case under load) needs no gather or scatter."""
    num_rows, vocab = len(rows), logits.shape[1]
    if logits.device.type == "cpu":  # (rows, words * 32) bytes of 0/1, viewed as bool: no conversion pass
        allowed = torch.from_numpy(np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little"))
        allowed = allowed.view(torch.bool)
    else:
        shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
        allowed = ((bitmask.to(logits.device, non_blocking=True).unsqueeze(-1) >> shifts) & 1).bool()
        allowed = allowed.reshape(num_rows, -1)
    if allowed.shape[1] >= vocab:
        allowed = allowed[:, :vocab]
    else:
        allowed = torch.cat([allowed, allowed.new_zeros(num_rows, vocab - allowed.shape[1])], dim=1)
    minus_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    if rows == list(range(logits.shape[0])):
        torch.where(allowed, logits, minus_inf, out=logits)
    else:
        index = torch.tensor(rows, device=logits.device)
        logits[index] = torch.where(allowed, logits[index], minus_inf)
