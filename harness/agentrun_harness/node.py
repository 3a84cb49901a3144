"""A real single-node Kubernetes cluster on this machine, for the end-to-end tests.

Owns everything the node needs and everything it changes on the host, so that ``down`` can
put the host back as it found it: the control plane (reused from :mod:`.controlplane`, bound
to 0.0.0.0 and advertising :data:`NODE_IP`), kube-scheduler, a private containerd (its own
config, root, state and socket under the work directory, never the system's), kubelet,
kube-proxy (iptables mode), CoreDNS as the cluster DNS (a host process on :data:`NODE_IP`
port 53, so pods resolve Service names as on any cluster), the CNI bridge, the node address
on ``lo``, the iptables chains kubelet, kube-proxy and the CNI plugins add, the kernel
settings kubelet and kube-proxy write, the cgroups under :data:`CGROUP_ROOT`, and the pod log
directories.

Before it changes anything, ``up`` records a baseline of the host (kernel settings, the
iptables chains already there, which of the shared directories existed) in the work
directory; ``down`` restores from it, sweeps what it finds by name, and deletes the work
directory. Nothing here pulls from a registry: the sandbox image is a static ``pause`` built
by ``scripts/build-controlplane.sh --node``, wrapped as an image tarball and imported; test
images are loaded the same way with :meth:`Cluster.load_image`. Needs root. This module never
builds binaries.

``python -m agentrun_harness.node up|down|status|load-image TAR --dir DIR`` is what
``make cluster-up`` and ``make cluster-down`` run.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from agentrun_harness import controlplane

NODE_NAME = "agentrun-node"
# The node's address: a /32 on lo (this kernel has no dummy interfaces), so pods reach the
# API server through the `kubernetes` Service and the host reaches NodePorts.
NODE_IP = "10.250.0.1"
POD_CIDR = "10.244.0.0/24"
CNI_NETWORK = "agentrun"
BRIDGE = "agentrun0"
# kubelet's cgroup root, under every cgroup v1 hierarchy: down removes the whole subtree.
CGROUP_ROOT = "agentrun"
PAUSE_IMAGE = "agentrun.local/pause:static"
CNI_BIN_DIR = Path("/usr/lib/cni")
CLUSTER_DOMAIN = "cluster.local"
NODE_BINARIES = (
    "kube-apiserver",
    "kube-controller-manager",
    "kubectl",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "pause",
)
HOST_TOOLS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "ip", "iptables", "conntrack")
# The long-running processes of a ready cluster.
COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "containerd",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "coredns",
)
# Processes that belong to a cluster: matched by executable and by a path of ours in their
# command line, so a crashed `up` that never wrote its state is still cleaned up.
OUR_EXECUTABLES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "containerd",
    "containerd-shim-runc-v2",
    "coredns",
)
# Written by kubelet (setupKernelTunables), kube-proxy and the bridge plugin; restored by down.
SYSCTLS = (
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
)
# Host directories that kubelet 1.20 and libcni hard-code whatever --root-dir says (pod logs,
# the device-plugin socket, libcni's result cache); down removes what appeared in them.
SHARED_DIRS = (
    Path("/var/log/pods"),
    Path("/var/log/containers"),
    Path("/var/lib/kubelet"),
    Path("/var/lib/kubelet/device-plugins"),
    Path("/var/lib/cni"),
    Path("/var/lib/cni/results"),
    Path("/run/containerd"),
    Path("/run/containerd/s"),
)
CHAIN_PREFIXES = ("KUBE-", "CNI-")
COREDNS_RBAC: list[dict[str, Any]] = [
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "agentrun:coredns"},
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["endpoints", "services", "pods", "namespaces"],
                "verbs": ["list", "watch"],
            },
            {
                "apiGroups": ["discovery.k8s.io"],
                "resources": ["endpointslices"],
                "verbs": ["list", "watch"],
            },
        ],
    },
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "agentrun:coredns"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "agentrun:coredns",
        },
        "subjects": [
            {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:coredns"}
        ],
    },
]


class NodeError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[cluster {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- images ---------------------------------------------------------------------------------


def host_binary_image(out: Path, *, name: str, binaries: dict[str, Path]) -> Path:
    """An image of this host's dynamically linked ``binaries`` (name in the image's PATH ->
    host path) with the shared libraries ``ldd`` finds for them, e.g. Debian's redis-server
    for a node that has no registry to pull ``redis`` from. No entrypoint: a pod's
    ``args[0]`` names the binary, as with images whose entrypoint is a shell script."""
    files: dict[str, Path] = {}
    for image_name, src in binaries.items():
        files[f"/{image_name}"] = src.resolve()
        for line in _run(["ldd", str(src)]).stdout.splitlines():
            # "libssl.so.3 => /lib/x86_64-linux-gnu/libssl.so.3 (0x...)" or "/lib64/ld-linux…"
            match = re.search(r"(/\S+) \(0x", line)
            if match:
                files[match.group(1)] = Path(match.group(1)).resolve()
    return static_image(out, name=name, files=files, entrypoint=[])


def static_image(out: Path, *, name: str, files: dict[str, Path], entrypoint: list[str]) -> Path:
    """A one-layer image tarball (``docker save`` layout) holding ``files`` (static
    binaries), importable by ``ctr images import``: images without a registry or a builder."""
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w") as layer:
        for dest, src in sorted(files.items()):
            info = layer.gettarinfo(str(src), arcname=dest.lstrip("/"))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o755
            info.mtime = 0
            with src.open("rb") as f:
                layer.addfile(info, f)
    layer_bytes = layer_buf.getvalue()
    diff_id = hashlib.sha256(layer_bytes).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Entrypoint": entrypoint, "Env": ["PATH=/"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "agentrun static_image"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = f"{hashlib.sha256(config_bytes).hexdigest()}.json"
    manifest = [{"Config": config_name, "RepoTags": [name], "Layers": [f"{diff_id}/layer.tar"]}]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, mode="w") as tar:
        for arcname, data in (
            (f"{diff_id}/layer.tar", layer_bytes),
            (config_name, config_bytes),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(arcname)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return out


# -- the host -------------------------------------------------------------------------------


def _sysctl_read(key: str) -> str | None:
    try:
        return Path("/proc/sys", key).read_text().strip()
    except OSError:
        return None


def _sysctl_write(key: str, value: str) -> None:
    try:
        Path("/proc/sys", key).write_text(value + "\n")
    except OSError as e:
        log(f"could not set {key.replace('/', '.')}={value}: {e}")


def _run(
    args: list[str], *, check: bool = True, timeout: float = 60, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise NodeError(f"{shlex.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _http_ok(url: str) -> bool:
    """A component's health endpoint answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _iptables_chains(tool: str) -> dict[str, list[str]]:
    """table -> chain names, from ``iptables-save``; empty when the tool is missing."""
    if not shutil.which(f"{tool}-save"):
        return {}
    out = _run([f"{tool}-save"], check=False).stdout
    tables: dict[str, list[str]] = {}
    table = ""
    for line in out.splitlines():
        if line.startswith("*"):
            table = line[1:]
            tables[table] = []
        elif line.startswith(":") and table:
            tables[table].append(line[1:].split()[0])
    return tables


def _sweep_iptables(tool: str, keep: dict[str, list[str]]) -> int:
    """Delete the KUBE-*/CNI-* chains that were not there before, and the rules jumping to
    them, in one ``iptables-restore --noflush`` per table. Returns the chains removed."""
    if not shutil.which(f"{tool}-save"):
        return 0
    removed = 0
    for table, chains in _iptables_chains(tool).items():
        ours = {c for c in chains if c.startswith(CHAIN_PREFIXES) and c not in keep.get(table, [])}
        if not ours:
            continue
        dump = _run([f"{tool}-save", "-t", table], check=False).stdout
        script = [f"*{table}"]
        for line in dump.splitlines():
            if not line.startswith("-A "):
                continue
            parts = shlex.split(line)
            chain = parts[1]
            target = parts[parts.index("-j") + 1] if "-j" in parts else None
            if chain not in ours and target in ours:
                # iptables-restore reads iptables-save's own quoting, not a shell's.
                script.append("-D " + line[len("-A ") :])
        script += [f"-F {c}" for c in sorted(ours)]
        script += [f"-X {c}" for c in sorted(ours)]
        script.append("COMMIT")
        proc = _run([f"{tool}-restore", "--noflush"], check=False, input="\n".join(script) + "\n")
        if proc.returncode != 0:
            log(f"{tool}: could not remove chains from {table}: {proc.stderr.strip()}")
        else:
            removed += len(ours)
    return removed


def _cgroup_mounts(*, unified: bool = False) -> list[Path]:
    """The cgroup v1 hierarchies mounted on this host, and with ``unified`` the cgroup2 one
    of a hybrid host (where runc mirrors the v1 cgroups it makes)."""
    types = ("cgroup", "cgroup2") if unified else ("cgroup",)
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] in types:
            mounts.append(Path(fields[1]))
    return mounts


def _mounts_under(root: Path) -> list[Path]:
    found = []
    prefix = str(root).rstrip("/") + "/"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix) or point == str(root):
            found.append(Path(point))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks: with the pid, it names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    # A zombie has exited: its parent (here, whoever adopted it) has not reaped it yet.
    return None if fields[0] == "Z" else fields[19]


def _ancestors() -> set[int]:
    pids: set[int] = set()
    pid = os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def _terminate(pids: list[int], *, grace: float = 10) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_proc_start(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _proc_start(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_proc_start(p) for p in pids):
        time.sleep(0.1)


class Cluster:
    """The single-node cluster whose state lives in ``workdir`` (``.work/cluster``)."""

    def __init__(
        self, *, workdir: Path, bin_dir: Path | None = None, coredns: Path | None = None
    ) -> None:
        self.workdir = workdir.resolve()
        self.bin_dir = bin_dir or controlplane.default_bin_dir(
            os.environ.get("NODE_K8S_VERSION", "1.34")
        )
        # Built by scripts/build-coredns.sh (cached by version); needed by `up` only.
        self.coredns = coredns
        self.plane = controlplane.ControlPlane(
            workdir=self.workdir / "controlplane",
            bin_dir=self.bin_dir,
            bind_address="0.0.0.0",
            advertise_address=NODE_IP,
        )
        self._procs: dict[str, dict[str, Any]] = {}
        self._ports: dict[str, int] = {}

    @functools.cached_property
    def _minor(self) -> int:
        """The Kubernetes minor version of the binaries (node flags differ across them)."""
        return self.plane.version()[1]

    # -- paths ---------------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        """The cluster-admin kubeconfig (a copy of the control plane's ``admin.yaml``)."""
        return self.workdir / "kubeconfig"

    def user_kubeconfig(self, user: str) -> Path:
        return self.plane.kubeconfig(user)

    @property
    def kubectl(self) -> Path:
        return self.bin_dir / "kubectl"

    @property
    def kubectl_cache(self) -> Path:
        """kubectl's discovery cache for this cluster (``--cache-dir``): not ``~/.kube``."""
        return self.workdir / "kubectl-cache"

    @property
    def containerd_socket(self) -> Path:
        return self.workdir / "containerd" / "containerd.sock"

    @property
    def logs_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def _state_file(self) -> Path:
        return self.workdir / "state.json"

    @property
    def _baseline_file(self) -> Path:
        return self.workdir / "baseline.json"

    # -- lifecycle -----------------------------------------------------------------------
    def running(self) -> bool:
        """Every process of a cluster that became ready is still the same process."""
        state = self._load(self._state_file)
        if not state or not state.get("ready"):
            return False
        procs = state.get("procs", {})
        return set(COMPONENTS) <= set(procs) and all(
            _proc_start(int(p["pid"])) == p["start"] for p in procs.values()
        )

    def attach(self) -> None:
        """Point this handle at the running cluster (its binaries, its API server's port)."""
        state = self._load(self._state_file)
        plane = self._load(self.plane.workdir / "state.json")
        if not self.running() or not state or not plane:
            raise NodeError(f"no cluster is running in {self.workdir}: run `make cluster-up`")
        self.bin_dir = self.plane.bin_dir = Path(state["bin_dir"])
        self.plane.port = int(plane["port"])
        self._procs, self._ports = state["procs"], state["ports"]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One up or down at a time per work tree (a test session and `make` may race)."""
        self.workdir.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.workdir.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def up(self, *, timeout: float = 300) -> None:
        """Bring the cluster up, or reuse it if it is already running (idempotent)."""
        with self._locked():
            self._up(timeout=timeout)

    def down(self) -> None:
        """Stop everything and put the host back as the baseline recorded it. Idempotent,
        and safe after a crash: what has no state is found by name."""
        with self._locked():
            self._down()

    def _up(self, *, timeout: float) -> None:
        if self.running():
            state = self._load(self._state_file) or {}
            if Path(state.get("bin_dir", "")) != self.bin_dir:
                raise NodeError(
                    f"the cluster in {self.workdir} runs the binaries of {state.get('bin_dir')}, "
                    f"not {self.bin_dir}: `make cluster-down` first to change its version"
                )
            log(f"reusing the running cluster in {self.workdir}")
            self.attach()
            return
        self._preflight()
        if self.workdir.exists():
            log("cleaning up what a previous cluster left")
            self._down()
        self._check_host_is_free()
        started = time.monotonic()
        self.logs_dir.mkdir(parents=True)
        self._save_baseline()
        steps = 8
        log(f"1/{steps} host: {NODE_IP} on lo, forwarding, cgroup root /{CGROUP_ROOT}")
        self._prepare_host()
        log(f"2/{steps} containerd (own root, state and socket under {self.workdir})")
        self._start_containerd(timeout=60)
        log(f"3/{steps} sandbox image {PAUSE_IMAGE}")
        pause = static_image(
            self.workdir / "images" / "pause.tar",
            name=PAUSE_IMAGE,
            files={"/pause": self.bin_dir / "pause"},
            entrypoint=["/pause"],
        )
        self.load_image(pause)
        log(f"4/{steps} control plane (etcd, kube-apiserver on 0.0.0.0, controller-manager)")
        self.plane.start(detach=True, timeout=120)
        for name, proc in self.plane.procs.items():
            self._record(name, proc.pid)
        shutil.copyfile(self.plane.kubeconfig("admin"), self.kubeconfig)
        self.kubeconfig.chmod(0o600)
        log(f"5/{steps} node identities and kube-scheduler")
        self._write_identities()
        self._start_scheduler()
        log(f"6/{steps} cluster DNS (CoreDNS on {NODE_IP}:53)")
        self._start_coredns()
        log(f"7/{steps} kubelet and kube-proxy")
        self._start_kubelet()
        self._start_kube_proxy()
        log(f"8/{steps} waiting for node {NODE_NAME} to be Ready and Services programmed")
        self._wait_ready(timeout)
        self._save_state(ready=True)
        log(f"ready in {time.monotonic() - started:.1f}s; KUBECONFIG={self.kubeconfig}")

    def _down(self) -> None:
        started = time.monotonic()
        baseline = self._load(self._baseline_file) or {}
        log(f"1/6 stopping node processes in {self.workdir}")
        cri = self.workdir / "containerd" / "root" / "io.containerd.grpc.v1.cri" / "sandboxes"
        sandboxes = set(os.listdir(cri)) if cri.is_dir() else set()
        self._kill_ours(("kubelet", "kube-proxy", "kube-scheduler", "coredns"))
        self._remove_containers()
        self._kill_cgroup_procs()
        self._kill_ours(("containerd-shim-runc-v2",), grace=5)
        self._kill_ours(("containerd",))
        log("2/6 stopping the control plane")
        # etcd last: an API server that loses etcd first is slow to stop.
        self._kill_ours(("kube-controller-manager", "kube-apiserver"))
        self._kill_ours(("etcd",))
        with contextlib.redirect_stderr(io.StringIO()):
            controlplane.main(["down", "--dir", str(self.plane.workdir)])
        log("3/6 unmounting and removing network namespaces, the bridge and cgroups")
        for point in _mounts_under(self.workdir):
            if _run(["umount", str(point)], check=False).returncode != 0:
                _run(["umount", "-l", str(point)], check=False)
        if Path(f"/sys/class/net/{BRIDGE}").exists():
            _run(["ip", "link", "del", BRIDGE], check=False)
        self._remove_cgroups()
        log("4/6 removing iptables rules")
        # Only with a baseline: without one, KUBE-*/CNI-* chains here are someone else's.
        if baseline:
            kube_proxy = self.bin_dir / "kube-proxy"
            if kube_proxy.exists():
                _run([str(kube_proxy), "--cleanup"], check=False)
            chains = baseline.get("iptables", {})
            removed = sum(_sweep_iptables(t, chains.get(t, {})) for t in ("iptables", "ip6tables"))
            if removed:
                log(f"removed {removed} iptables chains")
        log("5/6 restoring the node address, kernel settings and shared directories")
        if baseline and not baseline.get("lo_had_node_ip"):
            _run(["ip", "addr", "del", f"{NODE_IP}/32", "dev", "lo"], check=False)
        for key, value in baseline.get("sysctls", {}).items():
            if value is not None and _sysctl_read(key) != value:
                _sysctl_write(key, value)
        self._restore_shared_dirs(baseline.get("dirs", {}), sandboxes=sandboxes)
        log("6/6 removing the work directory")
        if self.workdir.exists():
            if _mounts_under(self.workdir):
                raise NodeError(f"mounts remain under {self.workdir}; not removing it")
            shutil.rmtree(self.workdir)
        log(f"down in {time.monotonic() - started:.1f}s")

    def load_image(self, tarball: Path) -> list[str]:
        """Import an image tarball (``docker save``/``buildah push docker-archive:``/OCI
        layout) into the node's containerd, where kubelet finds it. Returns its names."""
        out = _run(
            [
                "ctr",
                f"--address={self.containerd_socket}",
                "--namespace=k8s.io",
                "images",
                "import",
                str(tarball),
            ],
            timeout=600,
        ).stdout
        names = re.findall(r"unpacking (\S+) \(", out)
        log(f"loaded {', '.join(names) or tarball}")
        return names

    def log_tail(self, name: str, lines: int = 40) -> str:
        """The last lines of one component's log (node and control plane alike)."""
        for path in (self.logs_dir / f"{name}.log", self.plane.workdir / "logs" / f"{name}.log"):
            if path.exists():
                return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    # -- up, step by step ----------------------------------------------------------------
    def _preflight(self) -> None:
        if os.geteuid() != 0:
            raise NodeError("a real node needs root (containerd, iptables, cgroups, mounts)")
        missing = [b for b in NODE_BINARIES if not (self.bin_dir / b).exists()]
        if missing:
            raise NodeError(
                f"missing {', '.join(missing)} in {self.bin_dir}: run "
                "`scripts/build-controlplane.sh --node` (builds once, cached by version)"
            )
        tools = [t for t in HOST_TOOLS if not shutil.which(t)]
        if tools or not (CNI_BIN_DIR / "bridge").exists():
            raise NodeError(
                f"missing {', '.join(tools) or 'CNI plugins'}: apt-get install containerd runc "
                "containernetworking-plugins iptables conntrack"
            )
        if not shutil.which("etcd"):
            raise NodeError("etcd not found: apt-get install etcd-server")
        if not self.coredns or not self.coredns.exists():
            raise NodeError(
                f"CoreDNS binary {self.coredns or '(not given)'} not found: run "
                "`scripts/build-coredns.sh` (builds once, cached by version) and pass --coredns"
            )
        if len(str(self.containerd_socket)) > 100:
            raise NodeError(f"{self.containerd_socket} is too long for a unix socket path")

    def _check_host_is_free(self) -> None:
        """The node address, the bridge and the cgroup root are host-wide: one cluster per
        host. Another checkout's cluster (or a crashed one whose state is gone) holds them."""
        lo = _run(["ip", "-o", "addr", "show", "dev", "lo"], check=False).stdout
        taken = []
        if f" {NODE_IP}/32 " in lo:
            taken.append(f"{NODE_IP} on lo")
        if Path(f"/sys/class/net/{BRIDGE}").exists():
            taken.append(f"the {BRIDGE} bridge")
        if any((m / CGROUP_ROOT).exists() for m in _cgroup_mounts(unified=True)):
            taken.append(f"the /{CGROUP_ROOT} cgroups")
        if taken:
            raise NodeError(
                f"another cluster holds {', '.join(taken)}: run `make cluster-down` in the "
                "checkout that started it (or, if none did: `ip addr del "
                f"{NODE_IP}/32 dev lo; ip link del {BRIDGE}` and rmdir the cgroups)"
            )

    def _save_baseline(self) -> None:
        lo = _run(["ip", "-o", "addr", "show", "dev", "lo"], check=False).stdout
        dirs: dict[str, list[str] | None] = {}
        for d in SHARED_DIRS:
            dirs[str(d)] = sorted(os.listdir(d)) if d.is_dir() else None
        baseline = {
            "sysctls": {k: _sysctl_read(k) for k in SYSCTLS},
            "iptables": {t: _iptables_chains(t) for t in ("iptables", "ip6tables")},
            "lo_had_node_ip": f" {NODE_IP}/32 " in lo,
            "dirs": dirs,
        }
        self._baseline_file.write_text(json.dumps(baseline, indent=2))

    def _prepare_host(self) -> None:
        lo = _run(["ip", "-o", "addr", "show", "dev", "lo"]).stdout
        if f" {NODE_IP}/32 " not in lo:
            _run(["ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo"])
        # Pod -> ClusterIP -> pod on the same bridge is routed by the host.
        _sysctl_write("net/ipv4/ip_forward", "1")
        if _sysctl_read("net/bridge/bridge-nf-call-iptables") is None:
            _run(["modprobe", "br_netfilter"], check=False)
        _sysctl_write("net/bridge/bridge-nf-call-iptables", "1")
        for mount in _cgroup_mounts():
            root = mount / CGROUP_ROOT
            root.mkdir(exist_ok=True)
            # A new cpuset cgroup starts with no CPUs and no memory nodes: inherit them.
            for knob in ("cpuset.cpus", "cpuset.mems"):
                if (mount / knob).exists() and not (root / knob).read_text().strip():
                    (root / knob).write_text((mount / knob).read_text())

    def _start_containerd(self, *, timeout: float) -> None:
        base = self.workdir / "containerd"
        cni = self.workdir / "cni"
        (cni / "net.d").mkdir(parents=True)
        conflist = {
            "cniVersion": "0.4.0",
            "name": CNI_NETWORK,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(cni / "networks"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (cni / "net.d" / "10-agentrun.conflist").write_text(json.dumps(conflist, indent=2))
        base.mkdir(parents=True, exist_ok=True)
        cri = '[plugins."io.containerd.grpc.v1.cri"'
        config = f"""\
# The e2e node's private containerd: nothing under /var/lib/containerd or /etc is touched.
version = 2
root = "{base / "root"}"
state = "{base / "state"}"
oom_score = 0
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
]

[grpc]
  address = "{self.containerd_socket}"

[ttrpc]
  address = "{self.containerd_socket}.ttrpc"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{base / "opt"}"

  {cri}]
    sandbox_image = "{PAUSE_IMAGE}"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    netns_mounts_under_state_dir = true
    # No CAP_SYS_RESOURCE here: runc cannot set the negative oom_score_adj kubelet asks
    # for (-998 for sandboxes, down to -997 for containers); never go below containerd's.
    restrict_oom_score_adj = true

  {cri}.cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni / "net.d"}"
    max_conf_num = 1

  {cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

  {cri}.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"

  {cri}.containerd.runtimes.runc.options]
    SystemdCgroup = false
    Root = "{base / "runc"}"
"""
        (base / "config.toml").write_text(config)
        self._spawn("containerd", ["containerd", f"--config={base / 'config.toml'}"])

        def ready() -> bool:
            return (
                _run(
                    ["ctr", f"--address={self.containerd_socket}", "version"],
                    check=False,
                    timeout=10,
                ).returncode
                == 0
            )

        self._wait("containerd", ready, timeout)

    def _write_identities(self) -> None:
        pki = self.workdir / "pki"
        ca = self.plane.pki
        kubelet = controlplane.issue_client_cert(
            ca, pki, name=f"system:node:{NODE_NAME}", groups=("system:nodes",), file="kubelet"
        )
        proxy = controlplane.issue_client_cert(
            ca, pki, name="system:kube-proxy", groups=(), file="kube-proxy"
        )
        dns = controlplane.issue_client_cert(
            ca, pki, name="system:coredns", groups=(), file="coredns"
        )
        for who, (cert, key) in (("kubelet", kubelet), ("kube-proxy", proxy), ("coredns", dns)):
            config = {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "agentrun-e2e",
                        "cluster": {
                            "server": self.plane.server,
                            "certificate-authority": str(self.plane.ca_file),
                        },
                    }
                ],
                "users": [
                    {
                        "name": who,
                        "user": {"client-certificate": str(cert), "client-key": str(key)},
                    }
                ],
                "contexts": [{"name": who, "context": {"cluster": "agentrun-e2e", "user": who}}],
                "current-context": who,
            }
            path = pki / f"{who}.kubeconfig"
            path.write_text(yaml.safe_dump(config))
            path.chmod(0o600)
        # RBAC only (no Node authorizer): the built-in system:node role, bound to this node.
        _run(
            [
                str(self.kubectl),
                f"--kubeconfig={self.kubeconfig}",
                f"--cache-dir={self.kubectl_cache}",
                "create",
                "clusterrolebinding",
                "agentrun:node",
                "--clusterrole=system:node",
                f"--user=system:node:{NODE_NAME}",
            ]
        )
        # CoreDNS's read access, as the system:coredns ClusterRole of kubeadm clusters.
        _run(
            [
                str(self.kubectl),
                f"--kubeconfig={self.kubeconfig}",
                f"--cache-dir={self.kubectl_cache}",
                "apply",
                "-f",
                "-",
            ],
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": COREDNS_RBAC}),
        )

    def _start_coredns(self) -> None:
        root = self.workdir / "coredns"
        root.mkdir()
        self._ports["coredns-health"] = controlplane.free_port()
        # A Service name resolves in its namespace and in the cluster domain; anything else
        # goes to the host's resolvers. Bound to the node address only: port 53 of the
        # host's other addresses stays free.
        kube = self.workdir / "pki" / "coredns.kubeconfig"
        corefile = f"""\
.:53 {{
    bind {NODE_IP}
    errors
    health 127.0.0.1:{self._ports["coredns-health"]}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kube} coredns
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    forward . /etc/resolv.conf
    cache 5
    loop
}}
"""
        (root / "Corefile").write_text(corefile)
        assert self.coredns is not None  # checked by _preflight
        self._spawn("coredns", [str(self.coredns), "-conf", str(root / "Corefile")])

        health = f"http://127.0.0.1:{self._ports['coredns-health']}/health"
        self._wait("coredns", lambda: _http_ok(health), 60)

    def _start_scheduler(self) -> None:
        self._spawn(
            "kube-scheduler",
            [
                str(self.bin_dir / "kube-scheduler"),
                f"--kubeconfig={self.plane.kubeconfig('admin')}",
                "--leader-elect=false",
                # --port (insecure serving) is gone since 1.24.
                *(["--port=0"] if self._minor < 24 else []),
                "--secure-port=0",
                "--v=1",
            ],
        )

    def _start_kubelet(self) -> None:
        root = self.workdir / "kubelet"
        (root / "volume-plugins").mkdir(parents=True)
        self._ports["kubelet"] = controlplane.free_port(NODE_IP)
        self._ports["kubelet-healthz"] = controlplane.free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": self._ports["kubelet"],
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self._ports["kubelet-healthz"],
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.plane.ca_file)},
            },
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{CGROUP_ROOT}",
            "clusterDomain": CLUSTER_DOMAIN,
            "clusterDNS": [NODE_IP],
            "failSwapOn": False,
            # Like runc, kubelet cannot lower its own oom_score_adj without CAP_SYS_RESOURCE.
            "oomScoreAdj": 0,
            "volumePluginDir": str(root / "volume-plugins"),
            # A shared build machine: never evict or taint for disk the tests do not use.
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            # Imported images cannot be pulled again: never garbage-collect them.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "resolvConf": "/etc/resolv.conf",
            # Ready is reported at the first status update after the runtime is: 4 s, not 10.
            "nodeStatusUpdateFrequency": "4s",
            "serializeImagePulls": False,
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
        }
        (root / "config.yaml").write_text(yaml.safe_dump(config))
        self._spawn(
            "kubelet",
            [
                str(self.bin_dir / "kubelet"),
                f"--config={root / 'config.yaml'}",
                f"--kubeconfig={self.workdir / 'pki' / 'kubelet.kubeconfig'}",
                f"--root-dir={root}",
                f"--cert-dir={root / 'pki'}",
                # Remote (CRI) is the only runtime since 1.24, and the flag is gone since 1.27.
                *(["--container-runtime=remote"] if self._minor < 24 else []),
                f"--container-runtime-endpoint=unix://{self.containerd_socket}",
                # cadvisor's own containerd client: without it, it waits 5 s for the
                # system's socket at start, and has no container stats.
                f"--containerd={self.containerd_socket}",
                f"--pod-infra-container-image={PAUSE_IMAGE}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                # Gone since 1.23 (profiles live under the root directory).
                *([f"--seccomp-profile-root={root / 'seccomp'}"] if self._minor < 23 else []),
                "--v=1",
            ],
        )

    def _start_kube_proxy(self) -> None:
        self._ports["kube-proxy-healthz"] = controlplane.free_port()
        self._spawn(
            "kube-proxy",
            [
                str(self.bin_dir / "kube-proxy"),
                f"--kubeconfig={self.workdir / 'pki' / 'kube-proxy.kubeconfig'}",
                "--proxy-mode=iptables",
                f"--cluster-cidr={POD_CIDR}",
                f"--hostname-override={NODE_NAME}",
                # The node's IP, given: else kube-proxy polls for the Node until kubelet
                # registers it (seconds).
                f"--bind-address={NODE_IP}",
                f"--nodeport-addresses={NODE_IP}/32",
                "--oom-score-adj=0",
                # 0: leave the host's conntrack limits and timeouts as they are.
                "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
                f"--healthz-bind-address=127.0.0.1:{self._ports['kube-proxy-healthz']}",
                f"--metrics-bind-address=127.0.0.1:{controlplane.free_port()}",
                "--v=1",
            ],
        )

    def _wait_ready(self, timeout: float) -> None:
        def node_ready() -> bool:
            node = self._api_get(f"/api/v1/nodes/{NODE_NAME}")
            conditions = (node or {}).get("status", {}).get("conditions", [])
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        proxy_health = f"http://127.0.0.1:{self._ports['kube-proxy-healthz']}/healthz"
        self._wait("kubelet", node_ready, timeout)
        self._wait("kube-proxy", lambda: _http_ok(proxy_health), 60)

    # -- down, step by step --------------------------------------------------------------
    def _our_pids(self, executables: tuple[str, ...]) -> list[int]:
        marks = (str(self.workdir) + "/", str(self.plane._fast_dir()))
        skip = _ancestors()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in skip:
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            exe = os.path.basename(argv[0].decode(errors="replace"))
            cmdline = b" ".join(argv).decode(errors="replace")
            if exe in executables and any(m in cmdline for m in marks):
                pids.append(int(entry.name))
        return pids

    def _kill_ours(self, executables: tuple[str, ...], *, grace: float = 10) -> None:
        pids = self._our_pids(executables)
        if pids:
            _terminate(pids, grace=grace)

    def _remove_containers(self) -> None:
        """Kill and delete every task through containerd, so each shim exits cleanly."""
        if not self.containerd_socket.exists() or not self._our_pids(("containerd",)):
            return
        ctr = ["ctr", f"--address={self.containerd_socket}", "--namespace=k8s.io"]
        tasks = _run([*ctr, "tasks", "ls", "-q"], check=False, timeout=20).stdout.split()
        for task in tasks:
            _run([*ctr, "tasks", "kill", "--signal=SIGKILL", task], check=False, timeout=20)
        for task in tasks:
            _run([*ctr, "tasks", "delete", "--force", task], check=False, timeout=30)
        if tasks:
            log(f"removed {len(tasks)} containers")

    def _kill_cgroup_procs(self) -> None:
        for _ in range(5):
            pids: set[int] = set()
            for mount in _cgroup_mounts(unified=True):
                for procs in (mount / CGROUP_ROOT).rglob("cgroup.procs"):
                    with contextlib.suppress(OSError):
                        pids.update(int(p) for p in procs.read_text().split())
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)

    def _remove_cgroups(self) -> None:
        self._kill_cgroup_procs()
        for mount in _cgroup_mounts(unified=True):
            root = mount / CGROUP_ROOT
            if not root.is_dir():
                continue
            dirs = sorted(
                (p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
            )
            for d in [*dirs, root]:
                try:
                    d.rmdir()
                except OSError as e:
                    log(f"could not remove cgroup {d}: {e}")

    def _restore_shared_dirs(
        self, before: dict[str, list[str] | None], *, sandboxes: set[str]
    ) -> None:
        """Remove what kubelet and libcni left in the host directories they hard-code (libcni
        caches results there, named by network and sandbox), and those directories
        themselves if they did not exist before and are now empty."""
        if not before:
            return
        for d in (
            Path("/var/log/pods"),
            Path("/var/log/containers"),
            Path("/var/lib/kubelet/device-plugins"),
            Path("/var/lib/cni/results"),
        ):
            if not d.is_dir():
                continue
            had = before.get(str(d)) or []
            for entry in d.iterdir():
                if entry.name in had:
                    continue
                if d.name == "results" and not (
                    entry.name.startswith(f"{CNI_NETWORK}-")
                    or any(sandbox in entry.name for sandbox in sandboxes)
                ):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        for d in sorted(SHARED_DIRS, key=lambda p: len(p.parts), reverse=True):
            if before.get(str(d)) is None and d.is_dir():
                with contextlib.suppress(OSError):
                    d.rmdir()

    # -- helpers -------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> None:
        with open(self.logs_dir / f"{name}.log", "ab") as logfile:
            proc = subprocess.Popen(
                args,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._record(name, proc.pid)

    def _record(self, name: str, pid: int) -> None:
        self._procs[name] = {"pid": pid, "start": _proc_start(pid)}
        self._save_state(ready=False)

    def _save_state(self, *, ready: bool) -> None:
        state = {
            "ready": ready,
            "procs": self._procs,
            "ports": self._ports,
            "server": self.plane.server,
            "bin_dir": str(self.bin_dir),
            "node": NODE_NAME,
            "node_ip": NODE_IP,
        }
        self._state_file.write_text(json.dumps(state, indent=2))

    @staticmethod
    def _load(path: Path) -> dict[str, Any] | None:
        try:
            loaded: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return loaded

    def _wait(self, name: str, ready: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pid = int(self._procs[name]["pid"])
        while time.monotonic() < deadline:
            if _proc_start(pid) != self._procs[name]["start"]:
                raise NodeError(f"{name} exited; last log lines:\n{self.log_tail(name)}")
            if ready():
                return
            time.sleep(0.5)
        raise NodeError(f"{name} not ready after {timeout:.0f}s:\n{self.log_tail(name)}")

    def _api_get(self, path: str) -> dict[str, Any] | None:
        ctx = ssl.create_default_context(cafile=str(self.plane.ca_file))
        req = urllib.request.Request(
            self.plane.server + path,
            headers={"Authorization": f"Bearer {self.plane.token('admin')}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
                loaded: dict[str, Any] = json.loads(r.read())
                return loaded
        except (urllib.error.URLError, OSError, ValueError):
            return None


# -- command line for `make cluster-up` / `make cluster-down` --------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A real single-node Kubernetes cluster here.")
    parser.add_argument("action", choices=["up", "down", "status", "load-image"])
    parser.add_argument("tarball", nargs="?", type=Path, help="for load-image")
    parser.add_argument("--dir", type=Path, default=Path(".work/cluster"))
    parser.add_argument("--bin-dir", type=Path, default=None)
    parser.add_argument("--coredns", type=Path, default=None, help="CoreDNS binary, for up")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)
    cluster = Cluster(workdir=args.dir, bin_dir=args.bin_dir, coredns=args.coredns)
    try:
        if args.action == "status":
            ok = cluster.running()
            print(f"{'running' if ok else 'stopped'}: {cluster.workdir}")
            return 0 if ok else 1
        if args.action == "down":
            cluster.down()
            return 0
        if args.action == "load-image":
            if not args.tarball:
                parser.error("load-image needs a tarball")
            cluster.load_image(args.tarball)
            return 0
        cluster.up(timeout=args.timeout)
    except (NodeError, controlplane.ControlPlaneError) as e:
        log(f"error: {e}")
        if args.action == "up":
            log(f"logs: {cluster.logs_dir}; `make cluster-down` removes what was started")
        return 1
    print(cluster.kubeconfig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
