"""A stand-in for a model server: answers every request with what it received, as JSON.

It plays the application behind the sidecar, so the demo and the end-to-end tests can show which
headers (identity headers, a client's forged copy) and which body actually reached the model.
Not a model server: no inference, no routing; HTTP/1.1 with keep-alive, as Envoy talks to
inbound applications.

Run alone: `python -m authz.demo.upstream --port 8081`.
"""

from __future__ import annotations

import argparse
import json
import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Inference payloads in the tests are a few KB; 4 MiB bounds a misbehaving client.
MAX_BODY = 4 * 1024 * 1024
# The last requests are kept for assertions; bounded so a load test cannot grow it forever.
KEEP_REQUESTS = 1000


@dataclass(frozen=True, slots=True)
class Received:
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]  # lower-case names, in arrival order
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]


class _BadRequest(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: Envoy pools upstream connections
    # Headers and body go out as two writes; with Nagle on, the second waits for Envoy's
    # delayed ACK and every reused connection costs ~40 ms (measured: 44 ms vs 1.5 ms).
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return  # quiet: Envoy's access log (or the test) says what happened

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            return self._read_chunked()
        length_text = self.headers.get("content-length", "0") or "0"
        if not length_text.isdigit():
            raise _BadRequest("bad content-length")
        length = int(length_text)
        if length > MAX_BODY:
            raise _BadRequest("body too large")
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            size_line = self.rfile.readline(1024).split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise _BadRequest("bad chunk size") from None
            if size == 0:
                # Trailers end with an empty line.
                while self.rfile.readline(8192).strip():
                    pass
                return b"".join(chunks)
            total += size
            if total > MAX_BODY:
                raise _BadRequest("body too large")
            chunks.append(self.rfile.read(size))
            self.rfile.readline(8)  # CRLF after the chunk

    def _handle(self) -> None:
        try:
            body = self._read_body()
        except _BadRequest as exc:
            self._reply(400, {"error": str(exc)})
            self.close_connection = True
            return
        received = Received(
            method=self.command,
            path=self.path,
            headers=tuple((k.lower(), v) for k, v in self.headers.items()),
            body=body,
        )
        self.server.record(received)
        self._reply(
            200,
            {
                "model_server": "stand-in",
                "method": received.method,
                "path": received.path,
                "headers": {k: v for k, v in received.headers},
                "body": body.decode("utf-8", errors="replace"),
            },
        )

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, indent=1).encode() + b"\n"
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.requests: deque[Received] = deque(maxlen=KEEP_REQUESTS)
        self._lock = threading.Lock()

    def record(self, received: Received) -> None:
        with self._lock:
            self.requests.append(received)

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.requests)


class ModelStandIn:
    """The stand-in server on a background thread; `with ModelStandIn() as m: m.port`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = _Server((host, port))
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> ModelStandIn:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.1},
                name="model-stand-in",
                daemon=True,
            )
            self._thread.start()
        return self

    @property
    def requests(self) -> list[Received]:
        return self._server.snapshot()

    def requests_to(self, path_prefix: str) -> list[Received]:
        return [r for r in self.requests if r.path.startswith(path_prefix)]

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> ModelStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m authz.demo.upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args(argv)
    server = _Server((args.host, args.port))
    print(f"model stand-in on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
