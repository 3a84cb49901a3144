"""Helpers the SSE server's tests share: its settings against the test control plane, a
bare AgentRun to stream (no operator needed: tests write its events themselves), and
Debian's NGINX run from ``docs/nginx.conf`` itself (the integration and e2e tests)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from agentrun_harness.controlplane import ControlPlane, free_port
from agentrun_operator import sseclient as client
from agentrun_sse import settings

import support
from support import Kubectl


def sse_settings(cluster: ControlPlane, redis_url: str, **kw: object) -> settings.Settings:
    base = settings.Settings(
        host="127.0.0.1",
        port=0,
        heartbeat_seconds=0.2,
        redis_url=redis_url,
        kube=settings.KubeTarget(server=cluster.server, ca_file=str(cluster.ca_file)),
    )
    return settings.Settings(**{**base.__dict__, **kw})


def create_run(kubectl: Kubectl, namespace: str, name: str = "r1") -> str:
    """An AgentRun with nothing running it; returns its uid."""
    return support.create_run(kubectl, namespace, name, goal="watch me")


# -- NGINX in front of an SSE server, as docs/nginx.conf shows -------------------------

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED = ROOT / "docs" / "nginx.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def templated(*, upstream: str, listen: int, prefix: Path, edits: dict[str, str]) -> str:
    """docs/nginx.conf with this test's ports and private paths (and any edits)."""
    conf = DOCUMENTED.read_text()
    replacements = {
        "server 127.0.0.1:8080;": f"server {upstream};",
        "listen 8088;": f"listen 127.0.0.1:{listen};",
        "http {": (
            "http {\n"
            f"    access_log {prefix}/access.log;\n"
            f"    client_body_temp_path {prefix}/tmp/body;\n"
            f"    proxy_temp_path {prefix}/tmp/proxy;\n"
            f"    fastcgi_temp_path {prefix}/tmp/fastcgi;\n"
            f"    uwsgi_temp_path {prefix}/tmp/uwsgi;\n"
            f"    scgi_temp_path {prefix}/tmp/scgi;"
        ),
        **edits,
    }
    for old, new in replacements.items():
        assert old in conf, f"docs/nginx.conf no longer has {old!r}; update this test"
        conf = conf.replace(old, new, 1)
    return conf


@contextlib.contextmanager
def nginx(*, upstream: str, edits: dict[str, str] | None = None) -> Iterator[str]:
    """Debian's NGINX, configured as ``docs/nginx.conf`` shows, on a free loopback port in
    front of ``upstream`` (host:port); yields its base URL."""
    prefix = Path(tempfile.mkdtemp(prefix="agentrun-nginx-"))
    # Workers drop root for `nobody`: they must reach their temp directories.
    prefix.chmod(0o755)
    (prefix / "tmp").mkdir(mode=0o777)
    (prefix / "tmp").chmod(0o777)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(templated(upstream=upstream, listen=port, prefix=prefix, edits=edits or {}))
    proc = subprocess.Popen(
        [
            NGINX,
            "-p",
            str(prefix),
            "-c",
            str(conf),
            "-e",
            str(prefix / "error.log"),
            "-g",
            f"daemon off; pid {prefix}/nginx.pid;",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while True:  # nginx has no readiness signal but its listening socket
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                log = (prefix / "error.log").read_text() if (prefix / "error.log").exists() else ""
                raise AssertionError(f"nginx exited with {proc.returncode}:\n{out}\n{log}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            assert time.monotonic() < deadline, "nginx did not listen within 10s"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        shutil.rmtree(prefix, ignore_errors=True)


# -- a viewer that never reads ----------------------------------------------------------


class StuckViewer:
    """A viewer that never reads: a plain socket with a tiny receive buffer. ``read_all``
    finally reads what the server left in it, until the server closed the stream."""

    def __init__(self, port: int, path: str, token: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.setblocking(False)
        self.port, self.path, self.token = port, path, token

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_connect(self.sock, ("127.0.0.1", self.port))
        request = (
            f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {self.token}\r\nAccept: text/event-stream\r\n\r\n"
        )
        await loop.sock_sendall(self.sock, request.encode())

    async def read_all(self, *, timeout: float = 30) -> tuple[list[client.Message], bool]:
        """The messages, and whether the response ended properly (its last chunk came)."""
        loop = asyncio.get_running_loop()
        raw = bytearray()
        async with asyncio.timeout(timeout):
            while chunk := await loop.sock_recv(self.sock, 1 << 16):
                raw += chunk
                if raw.endswith(b"\r\n0\r\n\r\n"):
                    break
        self.sock.close()
        complete = raw.endswith(b"\r\n0\r\n\r\n")
        head, _, body = bytes(raw).partition(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n")[0], head[:200]
        parser = client.Parser()
        out = []
        for line in dechunk(body).decode(errors="replace").split("\n"):
            msg = parser.feed(line)
            if msg is not None:
                out.append(msg)
        return out, complete


def dechunk(body: bytes) -> bytes:
    """The payload of a chunked body (a cut-off last chunk counts as far as it goes)."""
    out, i = bytearray(), 0
    while i < len(body):
        j = body.find(b"\r\n", i)
        if j < 0:
            break
        size = int(body[i:j], 16)
        if size == 0:
            break
        out += body[j + 2 : j + 2 + size]
        i = j + 2 + size + 2
    return bytes(out)
