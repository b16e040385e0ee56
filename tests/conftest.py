"""Shared fixtures. S3 fixtures: a real S3 API (moto's HTTP server) on 127.0.0.1, used through
boto3 and pyarrow exactly as AWS would be; nothing is patched in-process."""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server

from storage.config import StorageConfig
from storage.uri import Store, open_store

# Triton kernels (model/write_kernel.py) run in Triton's interpreter on CPU tensors. The switch is
# read when Triton is first imported, which nothing above does: the test modules come later.
os.environ.setdefault("TRITON_INTERPRET", "1")

S3_REGION = "us-east-1"
logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise


def start_process_group(command: list[str], log: Path, env: dict[str, str], cwd: Path | None = None
                        ) -> subprocess.Popen:
    """`command` in its own process group, output to `log`, so that it and all it spawns stop together."""
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_process_group(process: subprocess.Popen, term_wait_s: float = 20.0, linger_s: float = 0.0) -> None:
    """SIGTERM the process group, SIGKILL it if the leader outlives `term_wait_s`; then wait
    `linger_s` for the group's other processes, which exit just after their leader."""
    for sig, wait_s in ((signal.SIGTERM, term_wait_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            time.sleep(linger_s)
            return
        except subprocess.TimeoutExpired:
            continue


_handed_out: set[int] = set()


def _ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A loopback port that is free now and that no other process will be handed meanwhile.

    The port is bound later by a server this test starts (Serve's proxy, a SuperLink, a Ray head).
    A port the kernel assigned (bind to 0) comes from the ephemeral range, from which Ray's own
    processes keep taking ports while they start, so one of them could take it first: a CI run
    failed with Serve's "Failed to bind to address". Ports below that range are never handed out
    by the kernel; the ones chosen here also lie above Ray's worker ports (10002-19999 by default).
    """
    low = _ephemeral_ports_start()
    candidates = [port for port in range(max(1024, low - 12000), low) if port not in _handed_out]
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _handed_out.add(port)  # a test asks for several before it starts anything
            return port
    raise RuntimeError(f"no free loopback port below the ephemeral range (which starts at {low})")


class _SerializedWrites:
    """WSGI wrapper that applies mutating requests one at a time.

    S3 makes each conditional PUT (If-None-Match / If-Match) atomic; moto checks the condition and
    then stores the object in two steps, so two requests racing through its threaded server could
    both pass. Serialising writes gives moto S3's linearizable semantics; reads stay concurrent.
    """

    def __init__(self, app) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        if environ["REQUEST_METHOD"] in ("PUT", "POST", "DELETE"):
            with self.lock:
                return list(self.app(environ, start_response))
        return self.app(environ, start_response)


class RestartableMotoServer(ThreadedMotoServer):
    """moto's threaded server whose `stop()` is a real outage and whose `start()` brings it back.

    ThreadedMotoServer.stop() leaves the listening socket open (the kernel still accepts
    connections) and keep-alive connections keep being served, so clients would not notice. Here
    stop() closes the listener and every open connection; start() listens again on the same port.
    moto's backend state lives in this process, so buckets and objects survive the restart.
    """

    def __init__(self, port: int) -> None:
        super().__init__(ip_address="127.0.0.1", port=port, verbose=False)
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def _server_entry(self) -> None:
        server = self

        class TrackingHandler(MotoRequestHandler):
            def setup(self) -> None:
                super().setup()
                with server._connections_lock:
                    server._connections.add(self.connection)

            def finish(self) -> None:
                with server._connections_lock:
                    server._connections.discard(self.connection)
                super().finish()

        app = _SerializedWrites(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(self._ip_address, self._port, app, True, request_handler=TrackingHandler)
        self._server_ready_event.set()
        self._server.serve_forever()

    def stop(self) -> None:
        super().stop()
        self._server.server_close()  # stop accepting: new connections are refused
        with self._connections_lock:
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)  # existing keep-alive connections break too
                except OSError:
                    pass


@pytest.fixture(scope="session")
def s3_server() -> Iterator[RestartableMotoServer]:
    """One moto server for the session, with test credentials and no host AWS config in reach."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": S3_REGION,
            "AWS_DEFAULT_REGION": S3_REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        }.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        server = RestartableMotoServer(free_port())
        server.start()
        yield server
        server.stop()


def s3_config_for(server: RestartableMotoServer, root: str, spool_dir: Path) -> StorageConfig:
    """Small retry budgets and timeouts so that outages show within a second or two."""
    return StorageConfig(
        root=root,
        s3_endpoint_url=server.endpoint_url,
        s3_region=S3_REGION,
        spool_dir=str(spool_dir),
        s3_max_attempts=2,
        s3_connect_timeout_s=2.0,
        s3_read_timeout_s=10.0,
    )


def create_bucket(server: RestartableMotoServer) -> str:
    name = f"reverie-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=server.endpoint_url, region_name=S3_REGION).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_bucket(s3_server: RestartableMotoServer) -> str:
    """A fresh, empty bucket per test."""
    return create_bucket(s3_server)


@pytest.fixture
def s3_config(s3_server: RestartableMotoServer, s3_bucket: str, tmp_path: Path) -> StorageConfig:
    return s3_config_for(s3_server, f"s3://{s3_bucket}/reverie", tmp_path / "spool")


@pytest.fixture
def s3_store(s3_config: StorageConfig) -> Store:
    return open_store(config=s3_config)


@pytest.fixture
def local_store(tmp_path: Path) -> Store:
    config = StorageConfig(root=str(tmp_path / "data"), spool_dir=str(tmp_path / "spool"))
    return open_store(config=config)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> Store:
    """The same test against both backends: one code path for file:// and s3://."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def outage_s3(s3_server: RestartableMotoServer) -> Iterator[RestartableMotoServer]:
    """A second server, on its own port, that a test may stop and start (state survives)."""
    server = RestartableMotoServer(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def outage_store(outage_s3: RestartableMotoServer, tmp_path: Path) -> Store:
    """A store in a fresh bucket on the `outage_s3` server."""
    bucket = create_bucket(outage_s3)
    return open_store(config=s3_config_for(outage_s3, f"s3://{bucket}/log", tmp_path / "spool"))
