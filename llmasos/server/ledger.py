"""The metering writer: one thread per server that flushes the running requests' usage entries to the database in
batches (every LLMASOS_METERING_FLUSH seconds, default 1, or at once when a request ends or many are dirty), retries
failed batches with backoff, and meanwhile keeps them in an fsync'ed journal under $LLMASOS_HOME/metering-journal that
is replayed when the database answers again — by this server, or by the next one to start if this one died.

The bound: a kill -9 loses the tokens delivered since the last successful flush or journal write: at most one flush
interval, plus, while the database is failing, the time one try takes to fail (PostgreSQL's lock timeout,
LLMASOS_DB_LOCK_TIMEOUT; on SQLite up to twice its busy timeout, LLMASOS_SQLITE_BUSY_TIMEOUT, since the process's
threads take turns at the file); between tries the journal is written every interval. If the journal cannot be
written either (its disk is full), entries wait in memory.

Entries carry cumulative counts, so a batch applied twice, or a journal replayed after its entries reached the
database, bills once. Nothing here ever raises into a request: a bill that cannot be written yet stays in memory and
the writer keeps trying."""

from __future__ import annotations

import concurrent.futures
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

from llmasos.server import ledger_store
from llmasos.server.ledger_store import Entry

log = logging.getLogger(__name__)
DEFAULT_FLUSH_SECONDS = 1.0
BATCH_SIZE = 128  # entries per transaction (it holds their keys' counters); this many dirty ones wake the writer
MAX_BACKOFF = 2.0  # seconds between the retries of a failing database


HOUSEKEEPING_SECONDS = 5.0  # how often the admissions that can no longer count are dropped


def _resolve(future: concurrent.futures.Future) -> None:
    try:
        future.set_result(True)
    except concurrent.futures.InvalidStateError:  # its waiter gave up (cancelled)
        pass


def flush_seconds() -> float:
    value = os.environ.get("LLMASOS_METERING_FLUSH", "")
    try:
        seconds = float(value) if value else DEFAULT_FLUSH_SECONDS
    except ValueError:
        raise ValueError(f"LLMASOS_METERING_FLUSH={value!r} is not a number of seconds") from None
    if not seconds > 0:
        raise ValueError(f"LLMASOS_METERING_FLUSH={value!r} must be a positive number of seconds")
    return seconds


class Journal:
    """This process's journal file, `<pid>-<uuid>.jsonl`: one JSON entry a line, fsync'ed before a write counts.
    The process holds an exclusive lock on it while it lives, so that others replay only the journals of the dead."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path: Path | None = None
        self._file = None
        self._size = 0

    def write(self, entries: list[Entry]) -> None:
        """Append and fsync, or raise OSError leaving the file as it was (a torn line is cut off again)."""
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"{os.getpid()}-{uuid.uuid4().hex[:12]}.jsonl"
            handle = open(path, "ab")  # noqa: SIM115 - open for the life of the journal
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.path, self._file, self._size = path, handle, 0
            _fsync_directory(self.directory)
        data = "".join(json.dumps(e.to_json(), separators=(",", ":")) + "\n" for e in entries).encode()
        try:
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError:
            try:
                self._file.truncate(self._size)
                self._file.seek(self._size)
            except OSError:
                self._drop()  # cannot even cut it back: leave it to a later replay and start another file
            raise
        self._size += len(data)

    def entries(self) -> list[Entry]:
        return read_journal(self.path) if self.path is not None else []

    def remove(self) -> None:
        """The journal's entries all reached the database: delete it."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        self._drop()

    def _drop(self) -> None:
        if self._file is not None:
            try:
                self._file.close()  # also releases the lock
            except OSError:
                pass
        self.path, self._file, self._size = None, None, 0


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_journal(path: Path) -> list[Entry]:
    """The latest entry of each record in a journal (a torn last line is skipped)."""
    latest: dict[str, Entry] = {}
    for line in path.read_bytes().splitlines():
        try:
            entry = Entry.from_json(json.loads(line))
        except (ValueError, TypeError):
            continue
        latest[entry.record_id] = entry  # cumulative: the last line of a record holds the most
    return list(latest.values())


def replay_dead_journals(directory: Path, url: str | None = None) -> int:
    """Apply the journals of processes that are gone (their lock is free), then delete them; returns the entries
    replayed. Their requests cannot run on, so each entry is final: its admission is released."""
    replayed = 0
    if not directory.is_dir():
        return 0
    for path in sorted(directory.glob("*.jsonl")):
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below, which releases the lock
        except FileNotFoundError:
            continue
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process is alive and replays it itself
            if not path.exists():
                continue  # another replayer got it first
            entries = [replace(e, complete=True) for e in read_journal(path)]
            if entries:
                ledger_store.apply(entries, url)
            path.unlink(missing_ok=True)
            replayed += len(entries)
            log.warning("replayed %d metering entries from the journal %s of a stopped server", len(entries), path)
    return replayed


class Ledger:
    """The running requests' usage entries of one server, and the thread that writes them. `open`, `update` and
    `finish` only touch memory (safe on the event loop); the database is written by the writer thread alone."""

    def __init__(self, url: str | None = None, journal_directory: Path | None = None,
                 flush_interval: float | None = None, on_released=None) -> None:
        from llmasos.db import database_url
        from llmasos.home import home

        self.url = url or database_url()
        self.journal = Journal(journal_directory or home() / "metering-journal")
        self.flush_interval = flush_interval if flush_interval is not None else flush_seconds()
        self.on_released = on_released  # called with an admission id once its release reached the database
        self._lock = threading.Condition(threading.Lock())
        self._dirty: dict[str, tuple[Entry, int]] = {}  # record id -> (entry, its version)
        self._journaled: dict[str, int] = {}  # record id -> version in the journal, not yet in the database
        self._waiters: dict[str, concurrent.futures.Future] = {}  # final writes someone waits for
        self._thread: threading.Thread | None = None
        self._closing = False
        self._urgent = False
        self._dead_replayed = False
        self._ended_keys: set[str] = set()  # keys whose requests ended since their old admissions were dropped
        self._housekeeping_at = time.monotonic()
        # What happened, for tests and logs.
        self.batches = self.failures = self.journal_writes = self.journal_failures = self.replayed = 0

    # --- called by requests (memory only) ---

    def open(self, entry: Entry, written: bool = False) -> Entry:
        """Start metering `entry`; `written`: its row was inserted with the admission already."""
        if not written:
            self._mark(entry, urgent=False)
        else:
            self._start()
        return entry

    def update(self, entry: Entry, prompt_tokens: int | None = None, completion_tokens: int | None = None,
               cost: float | None = None) -> None:
        """New cumulative counts of a running request; flushed with the next batch."""
        with self._lock:  # the writer copies entries under this lock: never half an update
            if prompt_tokens is not None:
                entry.prompt_tokens = prompt_tokens
            if completion_tokens is not None:
                entry.completion_tokens = completion_tokens
            if cost is not None:
                entry.cost = cost
        self._mark(entry, urgent=False)

    def finish(self, entry: Entry) -> concurrent.futures.Future:
        """The request ended: write its final counts now. The future is done once they are durable (database or
        journal); it never fails — a bill not written yet stays with the writer, which keeps trying."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            entry.complete = True
            self._waiters[entry.record_id] = future
        self._mark(entry, urgent=True)
        return future

    def _mark(self, entry: Entry, urgent: bool) -> None:
        with self._lock:
            _, version = self._dirty.get(entry.record_id, (entry, 0))
            self._dirty[entry.record_id] = (entry, version + 1)
            if urgent or len(self._dirty) >= BATCH_SIZE:
                self._urgent = True
                self._lock.notify()
        self._start()

    def start(self) -> None:
        """Start the writer (a starting server: it also replays the journals that dead servers left)."""
        self._start()

    def _start(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._closing:
                    self._thread = threading.Thread(target=self._run, name="llmasos-metering-writer", daemon=True)
                    self._thread.start()

    def pending(self) -> int:
        """Entries whose latest counts have not reached the database."""
        with self._lock:
            return len(self._dirty)

    def close(self, timeout: float = 10.0) -> None:
        """Flush what is left (the server is stopping) and stop the thread."""
        with self._lock:
            self._closing = True
            self._urgent = True
            self._lock.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        if self.pending():
            log.error("metering: %d usage entries could not be written before shutdown%s", self.pending(),
                      f"; they are in the journal {self.journal.path}" if self.journal.path else "")

    # --- the writer thread ---

    def _run(self) -> None:
        backoff, retry_at = 0.0, 0.0  # during an outage: the next database try waits out a growing backoff
        while True:
            with self._lock:
                if not self._urgent:
                    wait = self.flush_interval
                    if backoff:
                        wait = max(0.0, min(wait, retry_at - time.monotonic()))
                    self._lock.wait(wait)
                if self._closing and not self._dirty:
                    return
                batch = [(entry.record_id, replace(entry), version)
                         for entry, version in list(self._dirty.values())[:BATCH_SIZE]]
                self._urgent = len(self._dirty) > len(batch)  # more to write: no pause
            if backoff and time.monotonic() < retry_at and not self._closing:
                self._journal(batch)  # the database is not tried again yet: the journal keeps up meanwhile
                continue
            if not self._dead_replayed:
                self._replay_dead()
            if not batch:
                continue
            if backoff:
                self._journal(batch)  # in an outage, first on disk: the try below may wait its whole timeout
            try:
                ledger_store.apply([entry for _, entry, _ in batch], self.url)
            except Exception as exc:  # noqa: BLE001 - any failure of the database: journal, then retry
                self.failures += 1
                if backoff == 0.0:
                    log.warning("metering: writing %d usage entries failed (%s); journaling them and retrying",
                                len(batch), str(exc).splitlines()[0][:200])
                self._journal(batch)
                if self._closing:
                    return  # the journal (or, if even that failed, the log) has them; the next server replays it
                backoff = min(MAX_BACKOFF, max(0.05, backoff * 2))
                retry_at = time.monotonic() + backoff
                self._dead_replayed = False  # when the database is back, look for dead servers' journals again
                continue
            backoff = 0.0
            self.batches += 1
            self._written(batch)

    def _written(self, batch: list[tuple[str, Entry, int]]) -> None:
        done: list[concurrent.futures.Future] = []
        released: list[int] = []
        with self._lock:
            for record_id, entry, version in batch:
                if self._journaled.get(record_id, 0) <= version:
                    self._journaled.pop(record_id, None)
                current = self._dirty.get(record_id)
                if current is not None and current[1] == version:
                    del self._dirty[record_id]
                    if entry.complete:
                        if record_id in self._waiters:
                            done.append(self._waiters.pop(record_id))
                        if entry.admission_id is not None:
                            released.append(entry.admission_id)
            journal_done = self.journal.path is not None and not self._journaled
        for future in done:
            _resolve(future)
        if self.on_released is not None:
            for admission_id in released:
                self.on_released(admission_id)
        if journal_done:
            self._replay_own()
        self._ended_keys.update(e.key_name for _, e, _ in batch if e.complete and e.key_name is not None)
        if self._ended_keys and time.monotonic() - self._housekeeping_at > HOUSEKEEPING_SECONDS:
            ledger_store.forget_old_admissions(self._ended_keys, self.url)
            self._ended_keys, self._housekeeping_at = set(), time.monotonic()

    def _journal(self, batch: list[tuple[str, Entry, int]]) -> None:
        """Keep the failed batch's entries on disk (those not journaled at this version yet)."""
        with self._lock:
            fresh = [(record_id, entry, version) for record_id, entry, version in batch
                     if self._journaled.get(record_id, 0) < version]
        if not fresh:
            return
        try:
            self.journal.write([entry for _, entry, _ in fresh])
        except OSError as exc:
            self.journal_failures += 1
            if self.journal_failures % 100 == 1:  # once per outage or so, not every interval
                log.error("metering: the journal cannot be written either (%s); keeping %d entries in memory",
                          exc, len(fresh))
            return
        self.journal_writes += 1
        done = []
        with self._lock:
            for record_id, entry, version in fresh:
                self._journaled[record_id] = version
                if entry.complete and record_id in self._waiters:
                    done.append(self._waiters.pop(record_id))
        for future in done:
            _resolve(future)

    def _replay_own(self) -> None:
        """Everything this journal held has reached the database since: replay it (a no-op by then, entry by entry,
        since entries are cumulative) and delete it."""
        entries = self.journal.entries()
        try:
            if entries:
                ledger_store.apply(entries, self.url)
        except Exception:  # noqa: BLE001 - keep the journal; the next successful batch tries again
            return
        self.replayed += len(entries)
        log.warning("metering: the database answers again; replayed and removed the journal of %d entries",
                    len(entries))
        self.journal.remove()

    def _replay_dead(self) -> None:
        try:
            self.replayed += replay_dead_journals(self.journal.directory, self.url)
            self._dead_replayed = True
        except Exception:  # noqa: BLE001 - the database is down: the next batch tries again
            pass
