"""Real Redis servers for the tests: REDIS_URL when set, else redis-server from PATH.

A server the tests start lives in a temporary directory on a free port and
keeps an append-only file, so it can be stopped and started again without
losing data. With REDIS_URL the tests never flush anything: each test uses
its own key prefix. In CI a missing Redis fails the run instead of skipping.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis


def free_port() -> int:
    """A free port whose neighbour 10000 higher (a cluster node's bus) is free too.

    Both stay below 32768, where Linux starts handing out ports for outgoing
    connections: a port found free here can otherwise be taken by a client's
    connection before the server binds it (seen in CI: a cluster bus port).
    """
    for _ in range(100):
        port = random.randint(10_000, 22_000)
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"Redis is required in CI: {reason}")
    pytest.skip(reason)


class RedisServer:
    """A redis-server process this test session owns."""

    def __init__(self, folder: Path, *extra: str) -> None:
        self.folder = folder
        self.port = free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server, on another free port if its port was taken meanwhile."""
        for _ in range(3):
            try:
                self._start()
            except RuntimeError:
                if "Address already in use" not in self._log():
                    raise
                self.port = free_port()
            else:
                return
        self._start()

    def _log(self) -> str:
        log = self.folder / "redis.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def _start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe is not None
        (self.folder / "redis.log").unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--logfile", str(self.folder / "redis.log"), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        for _ in range(200):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: see {self.folder / 'redis.log'}")
            try:
                if client.ping():
                    client.close()
                    return
            except redis.exceptions.ConnectionError:
                time.sleep(0.025)  # waiting for a server to start, not for the clock
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
            self.proc = None


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    if shutil.which("redis-server") is None:
        unavailable("no REDIS_URL and no redis-server on PATH")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A three-master Redis Cluster on local ports, created with redis-cli --cluster create."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        unavailable("redis-server and redis-cli are needed for the cluster tests")
    root = tmp_path_factory.mktemp("cluster")
    nodes = [
        RedisServer(root / f"n{i}", "--cluster-enabled", "yes", "--enable-debug-command", "yes",
                    "--cluster-config-file", str(root / f"n{i}" / "nodes.conf"))
        for i in range(3)
    ]  # fmt: skip
    for node in nodes:
        node.start()
    subprocess.run(
        ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
         "--cluster-replicas", "0", "--cluster-yes"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    client = redis.Redis(port=nodes[0].port)
    for _ in range(400):
        if client.cluster("info")["cluster_state"] == "ok":
            break
        time.sleep(0.025)  # the cluster settles its slots
    client.close()
    yield f"redis+cluster://127.0.0.1:{nodes[0].port}"
    for node in nodes:
        node.stop()
