"""Real PostgreSQL servers for the tests: AGENT_POLICY_TEST_POSTGRES_URL, else 127.0.0.1:5432.

Without the variable the tests try the server this machine and CI start on
127.0.0.1:5432 (databases ``test`` and ``postgres``, trust authentication,
user ``postgres`` or the current user). Every test works in a schema of its
own (``?schema=t_...``) and drops that schema afterwards; no test drops a
database or touches another schema. Without a server the tests skip, except
in CI (``CI`` set), where a missing server fails the run.

:class:`PostgresServer` starts a private server in a temporary folder (initdb
and pg_ctl, as the ``postgres`` OS user when the tests run as root) that a
test may stop and start again.
"""

from __future__ import annotations

import getpass
import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.redis_servers import free_port

ENV = "AGENT_POLICY_TEST_POSTGRES_URL"


def unavailable(reason: str) -> None:
    """Skip, or fail in CI: a missing PostgreSQL must not pass unnoticed there."""
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required in CI: {reason}")
    pytest.skip(reason)


def _candidates() -> list[str]:
    users = ["postgres", getpass.getuser()]
    return [
        f"postgresql://{user}@127.0.0.1:5432/{db}" for db in ("test", "postgres") for user in users
    ]


def _reachable(url: str) -> str | None:
    """None when ``url`` accepts a connection that may create schemas, else why not."""
    try:
        with psycopg.connect(url, connect_timeout=2, autocommit=True) as conn:
            row = conn.execute("SELECT has_database_privilege(current_database(), 'CREATE')")
            allowed = row.fetchone()
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0]
    return None if allowed and allowed[0] else "may not create schemas"


def with_schema(url: str, schema: str) -> str:
    """``url`` with ``?schema=`` set to ``schema`` (other parameters kept)."""
    base, _, query = url.partition("?")
    kept = [p for p in query.split("&") if p and not p.startswith("schema=")]
    return base + "?" + "&".join([*kept, f"schema={schema}"])


def drop_schema(url: str, schema: str) -> None:
    """Drop one schema a test made (never anything else); a few tries while workers let go."""
    base = url.partition("?")[0]
    for _ in range(20):
        try:
            with psycopg.connect(base, connect_timeout=2, autocommit=True) as conn:
                conn.execute("SET lock_timeout = '2s'")
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                return
        except psycopg.Error:
            time.sleep(0.25)  # waiting for other processes' connections to end


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A server URL (no schema): the variable, else the first local candidate that works."""
    given = os.environ.get(ENV)
    if given:
        problem = _reachable(given.partition("?")[0])
        if problem is not None:
            unavailable(f"{ENV} is set but unusable: {problem}")
        return given
    problems = []
    for url in _candidates():
        problem = _reachable(url)
        if problem is None:
            return url
        problems.append(f"{url}: {problem}")
    unavailable("no PostgreSQL on 127.0.0.1:5432 (" + "; ".join(problems) + f"); set {ENV}")
    raise AssertionError("unreachable")


@pytest.fixture
def pg_schema(postgres_url: str) -> Iterator[str]:
    """A URL on a fresh schema of its own, dropped after the test."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    yield with_schema(postgres_url, schema)
    drop_schema(postgres_url, schema)


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    if found:
        return Path(found[0]).parent
    exe = shutil.which("pg_ctl")
    return None if exe is None else Path(exe).resolve().parent


class PostgresServer:
    """A PostgreSQL server this test owns: its own folder, port and data (kept across restarts)."""

    def __init__(self) -> None:
        bindir = _bindir()
        if bindir is None or not (bindir / "initdb").exists():
            unavailable("initdb and pg_ctl are needed to start a private PostgreSQL")
        assert bindir is not None
        self.bindir = bindir
        self.folder = Path(tempfile.mkdtemp(prefix="agentpolicy-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:  # initdb refuses root: the server runs as the postgres user
            shutil.chown(self.folder, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bindir / tool), *args]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stderr or done.stdout}")

    @property
    def url(self) -> str:
        """The server's ``postgres`` database as the ``postgres`` user."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        """Start (or start again) on the same port and data."""
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=40"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.folder / "log"), "-o", options, "-w",
            "-t", "60", "start",
        )  # fmt: skip

    def stop(self) -> None:
        """Stop at once (``-m fast``: sessions are ended, committed data stays)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        """Stop if running and delete the folder."""
        subprocess.run(
            [*(["runuser", "-u", "postgres", "--"] if self.as_root else []),
             str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def own_postgres(postgres_url: str) -> Iterator[PostgresServer]:
    """A private server that the test may stop and start (skips, or fails in CI, without one)."""
    del postgres_url  # skip or fail exactly as the shared server does when PostgreSQL is missing
    server = PostgresServer()
    server.start()
    yield server
    server.remove()
