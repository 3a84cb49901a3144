"""A real Redis Cluster on loopback: six ``redis-server --cluster-enabled yes`` joined by
``redis-cli --cluster create --cluster-replicas 1`` into three masters with one replica each,
as a platform team runs it; and a failover of one master (``CLUSTER FAILOVER`` on its
replica), as a rolling restart of the cluster does.

Owns those processes and their directories; never touches a Redis it did not start.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

from agentrun_harness import procs
from agentrun_harness.redisserver import RedisServer, RedisServerError


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too: at most 55535."""
    for _ in range(200):
        port = random.randint(20000, 45000)
        if all(_free(p) for p in (port, port + 10000)):
            return port
    raise RedisServerError("no free port pair (p, p+10000) below 55535 for a cluster node")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class RedisCluster(procs.Managed):
    def __init__(self, *, workdir: Path, masters: int = 3, replicas: int = 1) -> None:
        self.workdir = workdir
        self.masters = masters
        self.nodes = [
            RedisServer(
                workdir=workdir / f"node-{i}",
                port=_cluster_port(),
                extra_args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    # A failed master is replaced within seconds, not the default 15.
                    "--cluster-node-timeout",
                    "2000",
                ],
            )
            for i in range(masters * (1 + replicas))
        ]
        self.replicas = replicas
        self.proc = None  # the nodes have their own

    @property
    def url(self) -> str:
        """A URL of one node: a cluster client finds the others from it."""
        return self.nodes[0].url

    def start(self, *, timeout: float = 60) -> None:
        cli = shutil.which("redis-cli")
        if not cli:
            raise RedisServerError("redis-cli not found: apt-get install redis-tools")
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *[f"127.0.0.1:{n.port}" for n in self.nodes],
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + timeout
        # Ready: every slot served, and every replica synced with its master (a failover
        # asks a replica that is).
        while not all(self._ok(n.port) and self._synced(n.port) for n in self.nodes):
            if time.monotonic() > deadline:
                raise RedisServerError(f"the cluster was not ready in {timeout}s")
            time.sleep(0.1)

    def _cli(self, port: int, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", str(port), *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout

    def _ok(self, port: int) -> bool:
        try:
            info = self._cli(port, "cluster", "info")
        except subprocess.SubprocessError:
            return False
        return "cluster_state:ok" in info and "cluster_slots_ok:16384" in info

    def _synced(self, port: int) -> bool:
        info = self._cli(port, "info", "replication")
        return "role:master" in info or "master_link_status:up" in info

    def roles(self) -> dict[int, str]:
        """port -> "master" or "slave", as each node says."""
        return {n.port: self._cli(n.port, "role").splitlines()[0].strip() for n in self.nodes}

    def failover(self, master_port: int, *, timeout: float = 30) -> int:
        """Promote a replica of the master on ``master_port`` (``CLUSTER FAILOVER``, the
        graceful switch); returns the new master's port once every node agrees."""
        master_id = self._cli(master_port, "cluster", "myid").strip()
        replica = next(
            n.port
            for n in self.nodes
            if n.port != master_port
            and f"slave {master_id}"
            in self._cli(n.port, "cluster", "nodes").split("myself")[1].splitlines()[0]
        )
        deadline = time.monotonic() + timeout
        asked = 0.0
        while True:
            if time.monotonic() - asked > 5:  # asked again if a first request was refused
                said = self._cli(replica, "cluster", "failover").strip()
                asked = time.monotonic()
            roles = self.roles()
            if roles[replica] == "master" and roles[master_port] == "slave":
                if all(self._ok(n.port) for n in self.nodes):
                    return replica
            if time.monotonic() > deadline:
                raise RedisServerError(f"failover to {replica} did not finish ({said}): {roles}")
            time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
