"""A real PostgreSQL server for tests: Debian's `postgresql` binaries, a cluster in a temporary directory, a free
loopback port and the unix socket in that directory, run as a non-root user (initdb refuses root)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from llmasos.server.serving import free_port


class PostgresUnavailable(Exception):
    """PostgreSQL cannot be started here; the message says why."""


@dataclass
class PostgresServer:
    directory: Path
    port: int
    user: str
    process: subprocess.Popen

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "t") -> str:
        """A fresh, empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: PostgreSQL's "smart" shutdown; fast enough with no clients left
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def _binaries() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        on_path = shutil.which("initdb")
        if on_path is None:
            raise PostgresUnavailable("PostgreSQL is not installed (apt-get install -y postgresql; .ci/run does it)")
        return Path(on_path).parent
    return Path(found[-1]).parent


def start_postgres() -> PostgresServer:
    """Start a throwaway PostgreSQL server; raises PostgresUnavailable with the reason when it cannot."""
    bin_dir = _binaries()
    run_as = None
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable("running as root and there is no 'postgres' user to run the server") from None
        run_as = entry.pw_name
    directory = Path(tempfile.mkdtemp(prefix="llmasos-pg-"))
    data = directory / "data"
    if run_as is not None:
        os.chmod(directory, 0o755)
        shutil.chown(directory, user=run_as)
    user = run_as or pwd.getpwuid(os.geteuid()).pw_name
    initdb = subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8",
                             "--no-sync"], capture_output=True, text=True, user=run_as)
    if initdb.returncode != 0:
        shutil.rmtree(directory, ignore_errors=True)
        raise PostgresUnavailable(f"initdb failed: {initdb.stderr.strip()[-500:]}")
    port = free_port()
    log = open(directory / "server.log", "wb")  # noqa: SIM115 - the server writes it for its lifetime
    if run_as is not None:
        shutil.chown(directory / "server.log", user=run_as)
    process = subprocess.Popen(
        [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", str(directory),
         "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=300"],
        stdout=log, stderr=subprocess.STDOUT, user=run_as)
    server = PostgresServer(directory, port, user, process)
    deadline = time.monotonic() + 30
    import psycopg

    while True:
        try:
            psycopg.connect(f"host=127.0.0.1 port={port} user={user} dbname=postgres", connect_timeout=2).close()
            return server
        except psycopg.OperationalError as exc:
            if process.poll() is not None or time.monotonic() > deadline:
                text = (directory / "server.log").read_text(errors="replace")[-800:]
                server.stop()
                raise PostgresUnavailable(f"the PostgreSQL server did not start ({exc}): {text}") from None
            time.sleep(0.1)
