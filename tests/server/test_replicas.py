"""Three real `llmasos serve` processes on loopback, each with its own LLMASOS_HOME, sharing one PostgreSQL: hundreds
of concurrent requests with five keys are metered to the token, an rpm limit and a token quota hold across replicas
exactly, a key revoked through one replica is refused by the others at once, and a replica killed with SIGKILL
mid-stream gives its reservation back when the lease expires."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import REPO_ROOT, wait_until_healthy

from llmasos.server.serving import free_port

pytestmark = pytest.mark.slow
LEASE_SECONDS = 3.0  # replicas' reservation lease: a killed replica's requests stop counting within this
MODEL_ID = "tiny-long"


@dataclass
class Replica:
    url: str
    home: Path
    process: subprocess.Popen


def start_replica(checkpoint: Path, home: Path, database_url: str) -> Replica:
    port = free_port()
    env = {**os.environ, "LLMASOS_HOME": str(home), "LLMASOS_DATABASE_URL": database_url,
           "LLMASOS_RESERVATION_LEASE": str(LEASE_SECONDS)}
    log = open(home / "server.log", "wb")  # noqa: SIM115 - the replica writes it while it runs
    process = subprocess.Popen(
        [sys.executable, "-m", "llmasos", "serve", "--model", str(checkpoint), "--port", str(port), "--dtype",
         "float32", "--engine-in-process", "--num-threads", "1", "--max-connections-per-client", "0",
         "--log-level", "warning"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    return Replica(f"http://127.0.0.1:{port}", home, process)


def wait_healthy(replica: Replica, timeout: float = 120.0) -> None:
    wait_until_healthy(replica.process, replica.url, log=replica.home / "server.log", timeout=timeout)


@pytest.fixture(scope="module")
def replica_checkpoint(tmp_path_factory) -> Path:
    """A tiny model with a 16k context: a stream of 15,000 tokens is still running on a busy machine when the test
    kills its server (a 2k-context stream could finish into the socket buffers first)."""
    from support import family_config, make_checkpoint

    directory = tmp_path_factory.mktemp("checkpoints") / MODEL_ID
    make_checkpoint(directory, family_config("qwen2", num_hidden_layers=2, max_position_embeddings=16384), seed=3)
    return directory


@pytest.fixture(scope="module")
def cluster(postgres, replica_checkpoint, tmp_path_factory):
    from llmasos.db import dispose_all, upgrade
    from llmasos.server import auth

    database_url = postgres.create_database("replicas")
    upgrade(database_url)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMASOS_DATABASE_URL", database_url)
        keys = {name: auth.create_key(name) for name in ("free-a", "free-b", "free-c")}
        keys["quota"] = auth.create_key("quota", token_quota=400)
        keys["rpm"] = auth.create_key("rpm", rpm=30)
        keys["crash"] = auth.create_key("crash", max_concurrency=1)
        keys["revoked"] = auth.create_key("revoked")
        replicas = [start_replica(replica_checkpoint, tmp_path_factory.mktemp(f"replica{i}"), database_url)
                    for i in range(3)]
        try:
            for replica in replicas:
                wait_healthy(replica)
            yield replicas, keys, database_url
        finally:
            for replica in replicas:
                if replica.process.poll() is None:
                    os.killpg(replica.process.pid, signal.SIGTERM)
            for replica in replicas:
                try:
                    replica.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(replica.process.pid, signal.SIGKILL)
            dispose_all()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def one_request(client: httpx.AsyncClient, url: str, key: str, stream: bool, max_tokens: int):
    """(status, prompt tokens, completion tokens) as the client received them."""
    body = {"model": MODEL_ID, "prompt": "to be or not", "max_tokens": max_tokens, "temperature": 1.0}
    if not stream:
        response = await client.post(url + "/v1/completions", json=body, headers=bearer(key))
        if response.status_code != 200:
            return response.status_code, 0, 0
        usage = response.json()["usage"]
        return 200, usage["prompt_tokens"], usage["completion_tokens"]
    body.update(stream=True, stream_options={"include_usage": True})
    async with client.stream("POST", url + "/v1/completions", json=body, headers=bearer(key)) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, 0, 0
        usage = None
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[len("data: "):])
                usage = event.get("usage") or usage
        return 200, usage["prompt_tokens"], usage["completion_tokens"]


def usage_by_key(database_url: str) -> dict[str, tuple[int, int]]:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT key_name, SUM(prompt_tokens), SUM(completion_tokens) FROM usage "
                                       "GROUP BY key_name")).all()
    engine.dispose()
    return {name: (int(p), int(c)) for name, p, c in rows}


def unfinished_usage_rows(database_url: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    with engine.connect() as connection:
        count = connection.execute(text("SELECT COUNT(*) FROM usage WHERE completed_at IS NULL")).scalar()
    engine.dispose()
    return int(count)


def test_an_rpm_limit_across_replicas_admits_exactly_its_number(cluster):
    replicas, keys, database_url = cluster

    async def burst():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200)) as client:
            return await asyncio.gather(*(one_request(client, replicas[i % 3].url, keys["rpm"], False, 1)
                                          for i in range(60)))

    statuses = [status for status, _, _ in asyncio.run(burst())]
    assert statuses.count(200) == 30 and statuses.count(429) == 30, statuses


def test_hundreds_of_concurrent_requests_are_metered_to_the_token_and_the_quota_holds(cluster):
    replicas, keys, database_url = cluster
    rng = random.Random(0)
    names = ("free-a", "free-b", "free-c", "quota")
    plan = [(names[i % 4], replicas[rng.randrange(3)].url, rng.random() < 0.3, rng.randint(1, 6)) for i in range(600)]

    async def run():
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=700)) as client:
            return await asyncio.gather(*(one_request(client, url, keys[name], stream, max_tokens)
                                          for name, url, stream, max_tokens in plan))

    results = asyncio.run(run())
    received: dict[str, list[int]] = {name: [0, 0] for name in names}
    for (name, *_), (status, prompt, completion) in zip(plan, results, strict=True):
        assert status == 200 or (name == "quota" and status == 429), (name, status)
        received[name][0] += prompt
        received[name][1] += completion
    # Every answer was sent; a final usage write still queued behind others completes within a flush or two.
    deadline = time.monotonic() + 15
    while unfinished_usage_rows(database_url):
        assert time.monotonic() < deadline, "usage rows still incomplete"
        time.sleep(0.1)
    metered = usage_by_key(database_url)
    for name in names:
        assert metered.get(name, (0, 0)) == tuple(received[name]), name
    assert sum(metered["quota"]) <= 400  # reservations: in-flight requests cannot overrun the quota together
    assert sum(status == 429 for (name, *_), (status, *_) in zip(plan, results, strict=True) if name == "quota") > 0


def test_a_key_revoked_through_one_replica_is_refused_by_the_others_within_a_second(cluster):
    replicas, keys, database_url = cluster
    for replica in replicas:
        assert httpx.get(replica.url + "/v1/models", headers=bearer(keys["revoked"])).status_code == 200
    env = {**os.environ, "LLMASOS_HOME": str(replicas[0].home), "LLMASOS_DATABASE_URL": database_url}
    subprocess.run([sys.executable, "-m", "llmasos", "keys", "revoke", "revoked"], check=True, env=env,
                   cwd=REPO_ROOT, capture_output=True)
    revoked_at = time.monotonic()
    for replica in replicas[1:]:
        while httpx.get(replica.url + "/v1/models", headers=bearer(keys["revoked"])).status_code != 401:
            assert time.monotonic() - revoked_at < 1.0
            time.sleep(0.02)
    assert time.monotonic() - revoked_at < 1.0


def test_a_replica_killed_mid_stream_releases_its_reservation_when_the_lease_expires(cluster):
    replicas, keys, database_url = cluster
    victim, survivor = replicas[2], replicas[0]
    body = {"model": MODEL_ID, "prompt": "to be", "max_tokens": 15000, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as client:
        completed = [0, 0]  # what the victim's completed requests returned
        for _ in range(3):
            usage = client.post(victim.url + "/v1/completions", headers=bearer(keys["crash"]),
                                json={"model": MODEL_ID, "prompt": "x", "max_tokens": 4}).json()["usage"]
            completed = [completed[0] + usage["prompt_tokens"], completed[1] + usage["completion_tokens"]]
        with client.stream("POST", victim.url + "/v1/completions", json=body,
                           headers=bearer(keys["crash"])) as response:
            assert response.status_code == 200
            # Keep the line iterator: a temporary one (next(response.iter_lines())) is collected at once, and httpcore
            # then closes the connection, so the server aborts the stream after a few tokens (that, not the engine,
            # was why this stream once "stopped after 28 tokens" with ignore_eos alone).
            lines = response.iter_lines()
            killed_id = json.loads(next(lines)[len("data: "):])["id"]  # running: it holds the key's one slot
            held = client.post(survivor.url + "/v1/completions", headers=bearer(keys["crash"]),
                               json={"model": MODEL_ID, "prompt": "x", "max_tokens": 1})
            assert held.status_code == 429 and "concurrent" in held.json()["error"]["message"]
            os.killpg(victim.process.pid, signal.SIGKILL)
            killed_at = time.monotonic()
        victim.process.wait(timeout=10)
        while True:
            answer = client.post(survivor.url + "/v1/completions", headers=bearer(keys["crash"]),
                                 json={"model": MODEL_ID, "prompt": "x", "max_tokens": 1})
            if answer.status_code == 200:
                break
            assert answer.status_code == 429
            assert time.monotonic() - killed_at < LEASE_SECONDS + 1.0, "the reservation outlived its lease"
            time.sleep(0.1)
    # The victim's completed requests were metered before their answers were sent: the kill lost none of them. The
    # killed stream's row was opened at admission (its prompt billed) and holds what the ledger flushed before the kill.
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    with engine.connect() as connection:
        killed = connection.execute(text("SELECT prompt_tokens, completion_tokens FROM usage WHERE record_id = :id"),
                                    {"id": killed_id}).one()
    engine.dispose()
    prompt, completion = usage_by_key(database_url)["crash"]
    assert killed[0] > 0 and 0 <= killed[1] < 15000
    assert (prompt - killed[0], completion - killed[1]) == (completed[0] + answer.json()["usage"]["prompt_tokens"],
                                                            completed[1] + 1)


def test_a_replica_with_its_own_home_serves_the_library_of_the_shared_registry(cluster, tmp_path_factory):
    """The bundled model registered through one home is served by a replica whose store never held its files."""
    _, _, database_url = cluster
    first, second = tmp_path_factory.mktemp("library-a"), tmp_path_factory.mktemp("library-b")
    env = {**os.environ, "LLMASOS_HOME": str(first), "LLMASOS_DATABASE_URL": database_url}
    subprocess.run([sys.executable, "-m", "llmasos", "list"], check=True, env=env, cwd=REPO_ROOT,
                   capture_output=True)  # registers the bundled model in the shared registry, its files in `first`
    port = free_port()
    env = {**env, "LLMASOS_HOME": str(second)}
    with open(second / "server.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "llmasos", "serve", "--port", str(port), "--num-threads",
                                    "1", "--engine-in-process", "--log-level", "warning"], cwd=REPO_ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    replica = Replica(f"http://127.0.0.1:{port}", second, process)
    try:
        wait_healthy(replica)
        from llmasos.server import auth

        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("LLMASOS_DATABASE_URL", database_url)
            key = auth.create_key("library-user")
        answer = httpx.post(replica.url + "/v1/completions", headers=bearer(key), timeout=60,
                            json={"model": "shakespeare:tiny", "prompt": "ROMEO:", "max_tokens": 3})
        assert answer.status_code == 200, answer.text
        assert not (second / "models" / "checkpoints").exists() or not any((second / "models" / "checkpoints")
                                                                            .iterdir())
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
