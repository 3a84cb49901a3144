"""A real, local Kubernetes control plane for tests and the demo: etcd, kube-apiserver and
kube-controller-manager on loopback, no Docker.

Owns the processes, their certificates, the static bearer tokens of the test users and one
kubeconfig per user. The binaries come from ``scripts/build-controlplane.sh`` (``make
controlplane``), which builds them once and caches them by version; this module never builds.

``python -m agentrun_harness.controlplane up|down|status --dir DIR`` manages a
detached one for ``make demo``; tests use :class:`ControlPlane` directly.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from agentrun_harness import procs


@dataclass(frozen=True)
class User:
    name: str
    token: str
    groups: tuple[str, ...] = ()


# Static tokens: known to the tests, never to anything outside this machine's loopback.
USERS: dict[str, User] = {
    u.name: u
    for u in (
        User("admin", "agentrun-admin-token", ("system:masters",)),
        User("approver", "agentrun-approver-token", ("approvers",)),
        User("approver2", "agentrun-approver2-token", ("approvers",)),
        User("viewer", "agentrun-viewer-token", ("viewers",)),
        User("creator", "agentrun-creator-token", ("creators",)),
        User("nobody", "agentrun-nobody-token", ()),
        # The product's own identities, with the least-privilege roles of manifests/rbac.yaml.
        User("agentrun-operator", "agentrun-operator-token", ()),
        User("agentrun-webhooks", "agentrun-webhooks-token", ()),
    )
}
SERVICE_CIDR = "10.0.0.0/24"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"


def log(msg: str) -> None:
    print(f"[controlplane {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# Kubernetes minor -> the release the tests run: 1.20 from Debian's source package
# (scripts/build-controlplane.sh), the current one from the Go module proxy
# (build/k8s-1.34/go.mod, scripts/build-k8s-current.sh). A unit test keeps them in sync.
K8S_RELEASES = {"1.20": "1.20.2", "1.34": "1.34.10"}
DEFAULT_K8S = "1.34"


def k8s_release(version: str | None = None) -> str:
    wanted = version or os.environ.get("K8S_VERSION") or DEFAULT_K8S
    return K8S_RELEASES.get(wanted, wanted)


def default_bin_dir(version: str | None = None) -> Path:
    env = os.environ.get("AGENTRUN_K8S_BIN")
    if env:
        return Path(env)
    cache = os.environ.get("AGENTRUN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "agentrun"
    )
    return Path(cache) / f"k8s-{k8s_release(version)}" / "bin"


def _write_certs(pki: Path, *, hosts: list[str]) -> None:
    # Imported here: only the control plane for tests needs it, not the operator at run time.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    def key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def pem_key(k: rsa.RSAPrivateKey) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )

    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    later = now + dt.timedelta(days=365)
    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agentrun-test-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    sa_key = key()
    pki.mkdir(parents=True, exist_ok=True)
    (pki / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (pki / "ca.key").write_bytes(pem_key(ca_key))
    (pki / "sa.key").write_bytes(pem_key(sa_key))
    (pki / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    for f in pki.iterdir():
        f.chmod(0o600)
    _issue(pki, pki, file="apiserver", cn="kube-apiserver", hosts=hosts, server=True, days=365)


def _issue(
    pki: Path,
    out: Path,
    *,
    file: str,
    cn: str,
    groups: tuple[str, ...] = (),
    hosts: list[str] | None = None,
    server: bool,
    days: int,
) -> tuple[Path, Path]:
    """A certificate signed by the control plane's CA, written as FILE.crt and FILE.key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, rsa.RSAPrivateKey)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
    subject.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if hosts:
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / f"{file}.crt", out / f"{file}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def issue_server_cert(pki: Path, out: Path, *, hosts: list[str], name: str) -> tuple[Path, Path]:
    """A serving certificate signed by the control plane's CA (for webhooks on loopback)."""
    return _issue(pki, out, file=name, cn=name, hosts=hosts, server=True, days=30)


def issue_client_cert(
    pki: Path, out: Path, *, name: str, groups: tuple[str, ...], file: str
) -> tuple[Path, Path]:
    """A client certificate signed by the control plane's CA: user ``name`` (CN) in
    ``groups`` (O), for components that authenticate with certificates (kubelet, kube-proxy,
    and kube-apiserver towards kubelet)."""
    return _issue(pki, out, file=file, cn=name, groups=groups, server=False, days=365)


class ControlPlaneError(RuntimeError):
    pass


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager under ``workdir``."""

    def __init__(
        self,
        *,
        workdir: Path,
        bin_dir: Path | None = None,
        bind_address: str = "127.0.0.1",
        advertise_address: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.bin_dir = bin_dir or default_bin_dir()
        self.bind_address = bind_address
        self.advertise_address = advertise_address
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.port = 0
        self.etcd_port = 0

    # -- paths -------------------------------------------------------------------------
    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def kubectl(self) -> Path:
        return self.bin_dir / "kubectl"

    def kubeconfig(self, user: str = "admin") -> Path:
        return self.workdir / "kubeconfig" / f"{user}.yaml"

    def token(self, user: str) -> str:
        return USERS[user].token

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, *, detach: bool = False, timeout: float = 120) -> None:
        missing = [
            b
            for b in ("kube-apiserver", "kube-controller-manager", "kubectl")
            if not (self.bin_dir / b).exists()
        ]
        if missing:
            raise ControlPlaneError(
                f"missing {', '.join(missing)} in {self.bin_dir}: run `make controlplane` "
                "(builds Kubernetes once and caches it), or set AGENTRUN_K8S_BIN"
            )
        # The current Kubernetes needs a current etcd (1.34: etcd >= 3.5.13 for the consistent
        # list from the watch cache); scripts/build-k8s-current.sh links one into the bin dir.
        bundled = self.bin_dir / "etcd"
        etcd = str(bundled) if bundled.exists() else shutil.which("etcd")
        if not etcd:
            raise ControlPlaneError("etcd not found: apt-get install etcd-server")
        legacy = self.version() < (1, 24)  # --insecure-port, KCM --port: removed in 1.24
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        (self.workdir / "logs").mkdir(parents=True)
        started = time.monotonic()
        self.port = free_port()
        self.etcd_port = free_port()
        peer_port = free_port()
        hosts = [
            "127.0.0.1",
            "localhost",
            "10.0.0.1",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ]
        if self.advertise_address:
            hosts.append(self.advertise_address)
        _write_certs(self.pki, hosts=hosts)
        self._write_tokens()
        self._write_kubeconfigs()

        data = self._fast_dir() / "etcd"
        self._spawn(
            "etcd",
            [
                etcd,
                "--name=default",
                f"--data-dir={data}",
                f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                "--logger=zap",
                "--log-level=warn",
            ],
            detach=detach,
        )
        self._wait(
            "etcd",
            lambda: self._http_ok(f"http://127.0.0.1:{self.etcd_port}/health"),
            timeout,
        )
        args = [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            f"--bind-address={self.bind_address}",
            f"--secure-port={self.port}",
            *(["--insecure-port=0"] if legacy else []),
            f"--tls-cert-file={self.pki / 'apiserver.crt'}",
            f"--tls-private-key-file={self.pki / 'apiserver.key'}",
            f"--client-ca-file={self.pki / 'ca.crt'}",
            "--authorization-mode=RBAC",
            f"--token-auth-file={self.workdir / 'tokens.csv'}",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={self.pki / 'sa.pub'}",
            f"--service-account-signing-key-file={self.pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
        ]
        if self.advertise_address:
            args.append(f"--advertise-address={self.advertise_address}")
            # A node may register: `kubectl logs/exec` go through kubelet, which wants a
            # client certificate (kubelet authorizes it with a SubjectAccessReview).
            cert, key = issue_client_cert(
                self.pki,
                self.pki,
                name="kube-apiserver-kubelet-client",
                groups=("system:masters",),
                file="apiserver-kubelet-client",
            )
            args += [
                f"--kubelet-client-certificate={cert}",
                f"--kubelet-client-key={key}",
                "--kubelet-preferred-address-types=InternalIP",
            ]
        else:
            # Loopback-only: no node can reach the `kubernetes` Service, so do not publish it.
            args.append("--endpoint-reconciler-type=none")
        self._spawn("kube-apiserver", args, detach=detach)
        self._wait("kube-apiserver", lambda: self._api_ok("/readyz"), timeout)
        self._spawn(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig('admin')}",
                f"--service-account-private-key-file={self.pki / 'sa.key'}",
                f"--root-ca-file={self.pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={self.pki / 'ca.crt'}",
                f"--cluster-signing-key-file={self.pki / 'ca.key'}",
                "--leader-elect=false",
                *(["--port=0"] if legacy else []),
                "--secure-port=0",
                "--v=1",
            ],
            detach=detach,
        )
        # The service-account and token controllers running is our readiness signal: the
        # garbage collector starts with them.
        self._wait(
            "kube-controller-manager",
            lambda: self._api_ok("/api/v1/namespaces/default/serviceaccounts/default"),
            timeout,
        )
        self._save_state()
        log(f"ready at {self.server} in {time.monotonic() - started:.1f}s ({self.workdir})")

    def version(self) -> tuple[int, int]:
        """(major, minor) of the kube-apiserver in bin_dir, from its --version."""
        out = subprocess.run(
            [str(self.bin_dir / "kube-apiserver"), "--version"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout  # "Kubernetes v1.34.10"
        major, minor = out.split()[-1].lstrip("v").split(".")[:2]
        return int(major), int(minor)

    def stop(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            procs.stop(self.procs.pop(name, None), timeout=15)
        shutil.rmtree(self._fast_dir(), ignore_errors=True)

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs.values())

    def restart_apiserver(self, *, timeout: float = 60) -> None:
        """Kill and start kube-apiserver again with the same flags (fault tests)."""
        proc = self.procs["kube-apiserver"]
        args = [str(a) for a in proc.args]  # type: ignore[union-attr]
        # Current releases stop listening at once but may then wait a minute for open
        # long-running connections (watches) before exiting: no need to wait for that.
        procs.stop(proc, timeout=10)
        self._spawn("kube-apiserver", args, detach=False)
        self._wait("kube-apiserver", lambda: self._api_ok("/readyz"), timeout)

    # -- helpers -----------------------------------------------------------------------
    def _fast_dir(self) -> Path:
        # etcd fsyncs every write; on tmpfs that costs nothing, so tests stay fast.
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and os.access(shm, os.W_OK) else self.workdir
        digest = hashlib.sha256(str(self.workdir).encode()).hexdigest()[:12]
        return base / f"agentrun-etcd-{digest}"

    def _write_tokens(self) -> None:
        lines = [f'{u.token},{u.name},uid-{u.name},"{",".join(u.groups)}"' for u in USERS.values()]
        path = self.workdir / "tokens.csv"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)

    def _write_kubeconfigs(self) -> None:
        (self.workdir / "kubeconfig").mkdir(parents=True, exist_ok=True)
        for user in USERS.values():
            self.write_kubeconfig(self.kubeconfig(user.name), token=user.token, user=user.name)

    def write_kubeconfig(self, path: Path, *, token: str, user: str) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "agentrun-test",
                    "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": user, "context": {"cluster": "agentrun-test", "user": user}}],
            "current-context": user,
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)

    def _spawn(self, name: str, args: list[str], *, detach: bool) -> None:
        logfile = open(self.workdir / "logs" / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            args,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=detach,
        )
        logfile.close()

    def _wait(self, name: str, ready: object, timeout: float) -> None:
        assert callable(ready)
        deadline = time.monotonic() + timeout
        proc = self.procs[name]
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ControlPlaneError(
                    f"{name} exited with {proc.returncode}; last log lines:\n{self.log_tail(name)}"
                )
            if ready():
                return
            time.sleep(0.2)
        raise ControlPlaneError(
            f"{name} not ready after {timeout:.0f}s; last log lines:\n{self.log_tail(name)}"
        )

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.workdir / "logs" / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    @staticmethod
    def _http_ok(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _api_ok(self, path: str) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        req = urllib.request.Request(
            self.server + path, headers={"Authorization": f"Bearer {self.token('admin')}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=2, context=ctx) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _save_state(self) -> None:
        state = {
            "server": self.server,
            "port": self.port,
            "etcd_port": self.etcd_port,
            "pids": {n: p.pid for n, p in self.procs.items()},
            "bin_dir": str(self.bin_dir),
        }
        (self.workdir / "state.json").write_text(json.dumps(state, indent=2))


# -- command line for `make demo` ---------------------------------------------------------


def _load(workdir: Path) -> dict[str, object] | None:
    path = workdir / "state.json"
    if not path.exists():
        return None
    loaded: dict[str, object] = json.loads(path.read_text())
    return loaded


def _pids_alive(state: dict[str, object]) -> bool:
    pids = state.get("pids")
    if not isinstance(pids, dict):
        return False
    for pid in pids.values():
        try:
            os.kill(int(pid), 0)
        except OSError:
            return False
    return True


def _down(workdir: Path) -> None:
    state = _load(workdir)
    if not state or not isinstance(state.get("pids"), dict):
        return
    pids = state["pids"]
    assert isinstance(pids, dict)
    for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
        pid = pids.get(name)
        if pid:
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGTERM)
    (workdir / "state.json").unlink(missing_ok=True)
    shutil.rmtree(ControlPlane(workdir=workdir)._fast_dir(), ignore_errors=True)
    log(f"stopped the control plane in {workdir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Local Kubernetes control plane (no Docker).")
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--dir", type=Path, default=Path(".work/controlplane"))
    parser.add_argument("--bin-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    workdir = args.dir.resolve()
    state = _load(workdir)
    if args.action == "status":
        ok = bool(state and _pids_alive(state))
        print(f"{'running' if ok else 'stopped'}: {workdir}")
        return 0 if ok else 1
    if args.action == "down":
        _down(workdir)
        return 0
    if state and _pids_alive(state):
        log(f"reusing the running control plane at {state['server']}")
    else:
        _down(workdir)
        ControlPlane(workdir=workdir, bin_dir=args.bin_dir).start(detach=True)
    print(workdir / "kubeconfig" / "admin.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
