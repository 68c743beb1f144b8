"""The scrape endpoint: `GET`/`HEAD /metrics` and nothing else, for one process or the supervisor.

prometheus_client's `start_http_server` answers every path with the metrics ("for backwards
compatibility", exposition.py) and refuses HEAD. Here any other path is 404, so a typo in a
scrape config or a probe shows up as an error instead of a working scrape, and the port answers
exactly what the mesh's AuthorizationPolicy admits (deploy/base/authorizationpolicy.yaml:
`/metrics`). HEAD gets GET's headers without the body (RFC 9110, 9.3.2). The metrics
themselves, content negotiation (OpenMetrics, gzip) and `?name[]=` filtering stay
prometheus_client's (`make_wsgi_app`).

Process metrics (`process_*`, `python_gc_*`, `python_info`) are prometheus_client's own
collectors, registered on the same registry the OpenTelemetry reader writes to: the standard
names every Python exporter uses, so operators' existing dashboards and alerts apply.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.registry import CollectorRegistry

METRICS_PATH = "/metrics"
ALLOWED_METHODS = ("GET", "HEAD")

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def register_process_collectors(registry: CollectorRegistry) -> None:
    """process_* (from /proc: CPU, memory, fds, start time), python_gc_* and python_info."""
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    PlatformCollector(registry=registry)


def metrics_app(registry: CollectorRegistry) -> WsgiApp:
    """The WSGI app: the registry's metrics at /metrics for GET and HEAD; 404 / 405 else."""
    inner: WsgiApp = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") != METRICS_PATH:
            return _plain(start_response, "404 Not Found",
                          f"not found: the metrics are at {METRICS_PATH}\n")
        method = environ.get("REQUEST_METHOD", "")
        if method == "GET":
            return inner(environ, start_response)
        if method != "HEAD":
            return _plain(start_response, "405 Method Not Allowed",
                          f"method {method} not allowed: use GET or HEAD\n",
                          [("Allow", ", ".join(ALLOWED_METHODS))])
        answer: list[tuple[str, list[tuple[str, str]]]] = []

        def keep(status: str, headers: list[tuple[str, str]], _exc: object = None) -> None:
            answer.append((status, headers))

        body = b"".join(inner({**environ, "REQUEST_METHOD": "GET"}, keep))
        status, headers = answer[0]
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [b""]

    return app


def _plain(start_response: StartResponse, status: str, text: str,
           extra: list[tuple[str, str]] | None = None) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))), *(extra or [])])
    return [body]


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape (one every 15 s per Prometheus replica is noise)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> ThreadingWSGIServer:
    """Serve `registry` on host:port from a daemon thread; the server (`.server_address`,
    `.shutdown()`, `.server_close()`). Raises OSError if the address cannot be bound."""
    # As prometheus_client does: the address family from the host, so "::" binds IPv6.
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(ThreadingWSGIServer):
        address_family = family

    httpd: ThreadingWSGIServer = make_server(
        str(sockaddr[0]), port, metrics_app(registry), Server, handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="metrics-endpoint", daemon=True).start()
    return httpd
