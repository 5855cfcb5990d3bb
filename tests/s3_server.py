"""A real S3-compatible server on loopback for tests: moto's server mode in a child process, started and
stopped by the test that uses it (nothing outside 127.0.0.1 is ever contacted)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

from tests.dist_helpers import free_port

# Fake credentials for the local server; no instance-metadata lookups (they would leave the machine).
S3_ENV = {"AWS_ACCESS_KEY_ID": "calm-test", "AWS_SECRET_ACCESS_KEY": "calm-test", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def s3_server(bucket: str = "calm", start_timeout_s: float = 60.0):
    """Yields ``s3_uri(path)``, a function giving the ``s3://`` URI of ``path`` in ``bucket`` on the server.
    The AWS_* variables are set for this process and the ranks it spawns while the server runs."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {key: os.environ.get(key) for key in S3_ENV}
    os.environ.update(S3_ENV)
    try:
        _wait_until_listening(server, port, start_timeout_s)
        endpoint = f"endpoint_override=127.0.0.1:{port}&scheme=http&region={S3_ENV['AWS_DEFAULT_REGION']}"

        def s3_uri(path: str) -> str:
            return f"s3://{bucket}/{path}?{endpoint}"

        from pyarrow import fs

        created, _ = fs.FileSystem.from_uri(f"s3://{bucket}?{endpoint}&allow_bucket_creation=true")
        created.create_dir(bucket)
        yield s3_uri
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _wait_until_listening(server: subprocess.Popen, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the S3 test server exited with {server.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"the S3 test server did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s")
