"""A real `redis-server` for tests, on a free loopback port, never the system one on 6379.

Persistence is off (`--save "" --appendonly no`) and everything it writes lives in its own
temporary directory, removed on stop. The server can be stopped and restarted on the same
port (outage tests) and paused with SIGSTOP (a "slow Redis": the socket stays open, nothing
answers). Always used through a fixture or `with`, so it is stopped even when a test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from authz.demo.processes import free_port

__all__ = ["RedisServer", "free_port", "write_certificates"]

REDIS_SERVER = os.environ.get("AUTHZ_TEST_REDIS_SERVER", "/usr/bin/redis-server")

# A redis-server starts in ~10 ms here; 10 s tolerates a loaded CI machine.
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0


class Running:
    """`with x:` starts it and stops it whatever happens (a failed start included)."""

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class RedisServer(Running):
    def __init__(self, *, password: str | None = None, port: int | None = None,
                 tls: bool = False, extra_args: tuple[str, ...] = (),
                 config: str | None = None, sentinel: bool = False,
                 certificates: Path | None = None) -> None:
        """`tls`: serve TLS only (rediss://), with a throwaway CA whose certificate is at
        `ca_file`; the server certificate names 127.0.0.1 and localhost (`certificates`: a
        directory already holding them, shared by the nodes of one topology).
        `config`: text of a config file given first on the command line (a sentinel rewrites
        its own); `sentinel`: run as a sentinel (`redis-server FILE --sentinel`)."""
        self.password = password
        self.tls = tls
        self.port = port or free_port()
        self.extra_args = extra_args
        self.config = config
        self.sentinel = sentinel
        self.dir = Path(tempfile.mkdtemp(prefix="authz-redis-"))
        self._certificates = certificates
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    # -- addresses -------------------------------------------------------------------------
    @property
    def ca_file(self) -> Path:
        return (self._certificates or self.dir) / "ca.pem"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca_file}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def unix_socket(self) -> Path:
        return self.dir / "redis.sock"

    @property
    def unix_url(self) -> str:
        query = f"?password={self.password}" if self.password else ""
        return f"unix://{self.unix_socket}{query}"

    def client(self) -> redis.Redis:
        """A plain synchronous client for assertions (INFO, TTL, SCRIPT FLUSH, ...)."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                           socket_timeout=5.0, decode_responses=True, ssl=self.tls,
                           ssl_ca_certs=str(self.ca_file) if self.tls else None)

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> RedisServer:
        if self.running:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        head = [REDIS_SERVER]
        if self.config is not None:
            conf = self.dir / "redis.conf"
            if not conf.exists():  # a restart keeps what the server rewrote
                conf.write_text(self.config)
            head.append(str(conf))
            if self.sentinel:
                head.append("--sentinel")
        args = [
            *head,
            *(self._tls_args() if self.tls else ["--port", str(self.port)]),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.unix_socket),
            "--unixsocketperm", "700",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        args += list(self.extra_args)
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        try:
            self._wait_until_answering()
        except BaseException:
            self.stop()
            raise
        return self

    def _tls_args(self) -> list[str]:
        certs = self._certificates or self.dir
        if not (certs / "ca.pem").exists():
            write_certificates(certs)
        return ["--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", str(certs / "server.pem"),
                "--tls-key-file", str(certs / "server.key"),
                "--tls-ca-cert-file", str(self.ca_file),
                "--tls-auth-clients", "no"]

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}: "
                                   f"{self.log_tail()}")
            try:
                with self.client() as client:
                    if client.ping():
                        return
            except redis.RedisError as e:
                last_error = e
            time.sleep(0.01)
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING within "
                           f"{_START_TIMEOUT} s ({last_error}): {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL, keeping the directory (a crash: for failover tests)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if self._paused:
                self.resume(proc)
            proc.kill()
            proc.wait(_STOP_TIMEOUT)

    def stop(self) -> None:
        """Stop the process and remove its directory (persistence is off). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        if self._paused:
            self.resume(proc)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(_STOP_TIMEOUT)
        shutil.rmtree(self.dir, ignore_errors=True)

    def restart(self) -> None:
        """Stop, then start again on the same port (an outage the client must survive)."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers, like an overloaded Redis."""
        if self._proc is None:
            raise RuntimeError("redis-server is not running")
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self, proc: subprocess.Popen[bytes] | None = None) -> None:
        proc = proc or self._proc
        if proc is not None and self._paused:
            proc.send_signal(signal.SIGCONT)
        self._paused = False

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.dir / "redis.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def write_certificates(directory: Path) -> None:
    """A throwaway CA (ca.pem) and a server certificate it signed (server.pem/.key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "authz test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(cert.public_bytes(pem))
    (directory / "server.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
