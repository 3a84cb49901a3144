"""A real ``redis-server`` on a free loopback port, for tests and the demo.

Owns one redis-server process and its directory; never touches a Redis it did not start.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from agentrun_harness import procs
from agentrun_harness.controlplane import free_port


class RedisServerError(RuntimeError):
    pass


class RedisServer(procs.Managed):
    def __init__(
        self,
        *,
        workdir: Path,
        port: int | None = None,
        appendonly: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, timeout: float = 20) -> None:
        binary = shutil.which("redis-server")
        if not binary:
            raise RedisServerError("redis-server not found: apt-get install redis-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.workdir),
                "--save",
                "",
                # AOF on, as the chart deploys it: a restart keeps streams and checkpoints.
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--appendfsync",
                "everysec",
                "--daemonize",
                "no",
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                raise RedisServerError(f"redis-server exited with {self.proc.returncode}:\n{tail}")
            if self._ping():
                return
            time.sleep(0.05)
        raise RedisServerError(f"redis-server not answering on port {self.port} after {timeout}s")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        procs.stop(self.proc, timeout=10)
        self.proc = None

    def kill(self) -> None:
        procs.kill(self.proc)
        self.proc = None
