"""kill -9 of a real `llmasos serve` with streams in flight, on SQLite and PostgreSQL: the database holds each running
request's tokens up to one flush interval before the kill (what its client had received then, at least), completed
requests are billed exactly, and the reservations of the dead server lapse with their lease. A second kill while the
database is locked leaves the bills in the journal, which the restarted server replays once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO_ROOT, wait_until_healthy
from sqlalchemy import select
from support_faults import Stream, write_lock_held

from llmasos.db import database_url, dispose_all, session
from llmasos.server import auth
from llmasos.server.limits_store import AdmissionRow
from llmasos.server.serving import free_port

DATABASES = ("sqlite", "postgresql")
pytestmark = pytest.mark.slow  # three server starts per database
MODEL_ID = "tiny-long"
FLUSH = 0.25  # the server's metering flush interval
LOCK_WAIT = 0.3  # how long one write waits behind a lock before failing (SQLite busy timeout, PostgreSQL lock_timeout)
LEASE = 2.0
MARGIN = 0.5  # scheduling slack on two busy cores: a flush that was due may run this much later


class Server:
    def __init__(self, checkpoint: Path, home: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "LLMASOS_METERING_FLUSH": str(FLUSH), "LLMASOS_RESERVATION_LEASE": str(LEASE),
               "LLMASOS_SQLITE_BUSY_TIMEOUT": str(LOCK_WAIT), "LLMASOS_DB_LOCK_TIMEOUT": str(LOCK_WAIT)}
        self.log = home / f"server-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "llmasos", "serve", "--model", str(checkpoint), "--port",
                 self.url.rsplit(":", 1)[1], "--dtype", "float32", "--engine-in-process", "--num-threads", "1",
                 "--log-level", "warning"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        wait_until_healthy(self.process, self.url, log=self.log)

    def kill(self) -> float:
        os.killpg(self.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        self.process.wait(timeout=10)
        return killed_at

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def rows_by_record() -> dict[str, tuple[int, int, bool]]:
    usage = auth.UsageRecord
    with session() as db:
        found = db.execute(select(usage.record_id, usage.prompt_tokens, usage.completion_tokens, usage.completed_at)
                           .where(usage.key_name == "crash")).all()
    return {r: (p, c, done is not None) for r, p, c, done in found}


def complete(url: str, key: str) -> tuple[str, dict]:
    response = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                          json={"model": MODEL_ID, "prompt": "To be", "max_tokens": 5})
    assert response.status_code == 200, response.text
    return response.json()["id"], response.json()["usage"]


def start_streams(url: str, key: str, count: int = 3) -> list[Stream]:
    streams = [Stream(url, key, MODEL_ID, 1800) for _ in range(count)]
    deadline = time.monotonic() + 60
    while not all(s.tokens >= 20 for s in streams):
        assert time.monotonic() < deadline and not any(s.error or s.done for s in streams), "streams did not run"
        time.sleep(0.02)
    return streams


def check_in_flight(streams: list[Stream], killed_at: float, bound: float, prompt_tokens: int) -> None:
    rows = rows_by_record()
    for stream in streams:
        stream.join()
        assert not stream.done, "a stream ended before the kill: it would not test a crash"
        prompt, completion, _ = rows[stream.request_id]
        assert prompt == prompt_tokens
        # Billed: at least what the client had one bound before the kill, never more than it received in all.
        assert stream.tokens_at(killed_at - bound) <= completion <= stream.tokens, \
            (stream.tokens_at(killed_at - bound), completion, stream.tokens)


@pytest.fixture(scope="module")
def crash_checkpoint(tmp_path_factory) -> Path:
    from support import family_config, make_checkpoint

    directory = tmp_path_factory.mktemp("checkpoints") / MODEL_ID
    make_checkpoint(directory, family_config("qwen2", num_hidden_layers=2, max_position_embeddings=2048), seed=3)
    return directory


def test_kill_9_with_streams_in_flight_loses_at_most_one_flush_interval(home, crash_checkpoint):
    key = auth.create_key("crash", max_concurrency=3)
    server = Server(crash_checkpoint, home)
    try:
        completed = dict(complete(server.url, key) for _ in range(3))
        prompt_tokens = next(iter(completed.values()))["prompt_tokens"]
        streams = start_streams(server.url, key)
        time.sleep(1.0)  # a few flush intervals into the streams
        killed_at = server.kill()
        check_in_flight(streams, killed_at, FLUSH + MARGIN, prompt_tokens)
        rows = rows_by_record()
        for request_id, usage in completed.items():  # billed exactly, before their answers were sent
            assert rows[request_id] == (usage["prompt_tokens"], usage["completion_tokens"], True)
        # The dead server's admissions still hold the key's three slots, until their lease lapses.
        with session() as db:
            live = db.execute(select(AdmissionRow.expires_at).where(AdmissionRow.key_name == "crash",
                                                                    AdmissionRow.released_at.is_(None))).all()
        assert len(live) == 3

        server = Server(crash_checkpoint, home)  # lapsed by now (a start takes longer than the lease) or soon
        deadline = time.monotonic() + LEASE + 5
        while True:
            response = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": MODEL_ID, "prompt": "To be", "max_tokens": 5}, timeout=60)
            if response.status_code == 200:
                break
            assert response.status_code == 429 and time.monotonic() < deadline, response.text
            time.sleep(0.1)
        completed[response.json()["id"]] = response.json()["usage"]

        # Again, with the database locked: the bills go to the journal, which the next server replays.
        streams = start_streams(server.url, key)
        time.sleep(0.5)
        journal = home / "metering-journal"
        with write_lock_held(database_url()):
            locked_at = time.monotonic()
            time.sleep(1.5)
            assert list(journal.glob("*.jsonl")), "the server wrote no journal while the database was locked"
            killed_at = server.kill()
        before = rows_by_record()
        assert all(before[s.request_id][1] <= s.tokens_at(locked_at + MARGIN) for s in streams)  # stuck at the lock
        server = Server(crash_checkpoint, home)
        deadline = time.monotonic() + 30
        while list(journal.glob("*.jsonl")):  # replayed at startup, then deleted
            assert time.monotonic() < deadline, "the journal was not replayed"
            time.sleep(0.1)
        # The bound while the database fails: a flush interval plus one failing try, which on SQLite may first wait
        # for another thread's failing try (the lease renewer's) since a process's threads take turns at the file.
        check_in_flight(streams, killed_at, FLUSH + 2 * LOCK_WAIT + MARGIN, prompt_tokens)
        rows = rows_by_record()
        assert all(rows[s.request_id][2] for s in streams)  # a dead server's journal entries are final
        for request_id, usage in completed.items():
            assert rows[request_id] == (usage["prompt_tokens"], usage["completion_tokens"], True)
        assert auth.tokens_used("crash") == sum(p + c for p, c, _ in rows.values())
    finally:
        server.stop()
        dispose_all()
