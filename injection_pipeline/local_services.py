"""Local stand-ins for the cloud services, for tests and the laptop demo.

* :func:`start_moto_s3` - a moto S3 server (real HTTP on 127.0.0.1, free port) plus the
  environment (AWS_ENDPOINT_URL, dummy credentials, region) to give the driver and executors.
* :func:`start_survey_http_server` - a static file server laid out like the public Legacy
  Surveys URL tree (``<base>/south/coadd/<AAA>/<brick>/<file>``) with HEAD/GET, Content-Length,
  Last-Modified, ETag, single byte ranges, 404s, per-path request counters and fault injection
  (HTTP 5xx for the first K requests, connection resets, truncated bodies).
* :class:`FaultyS3Proxy` - a fault-injecting HTTP proxy in front of a local S3 server (503
  SlowDown, connection resets, stalls past the read timeout, cut bodies) on a deterministic
  schedule (:func:`hashed_fault_schedule`), for the flaky-S3 tests of stage 4c.

Note: moto keeps its state in process-global backends: two moto servers started in the same
process share buckets.  Use unique bucket names.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import email.utils
import fnmatch
import hashlib
import logging
import os
import posixpath
import socket
import struct
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable, Iterator, Mapping

__all__ = [
    "MotoS3Server",
    "start_moto_s3",
    "moto_env",
    "patched_environ",
    "FaultRule",
    "SurveyHTTPServer",
    "start_survey_http_server",
    "AWS_ENV_TO_CLEAR",
    "FaultyS3Proxy",
    "hashed_fault_schedule",
]

DUMMY_REGION = "us-east-1"

# Variables that would override / confuse a local endpoint if inherited from the user's shell.
AWS_ENV_TO_CLEAR = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_REGION",
)


def moto_env(endpoint_url: str, region: str = DUMMY_REGION) -> dict[str, str]:
    """Environment for boto3 clients (driver and executors) talking to a local S3 endpoint."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": region,
    }


@contextlib.contextmanager
def patched_environ(env: Mapping[str, str], unset: Iterable[str] = ()) -> Iterator[None]:
    """Set ``env`` (and remove ``unset``) in os.environ; restore the previous values on exit."""
    keys = set(env) | set(unset)
    saved = {k: os.environ.get(k) for k in keys}
    try:
        for k in unset:
            os.environ.pop(k, None)
        os.environ.update({k: str(v) for k, v in env.items()})
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------- moto
class MotoS3Server:
    """Handle on a running moto S3 server.  ``.endpoint_url``, ``.env``, ``.stop()``."""

    def __init__(self, server, host: str, port: int, region: str = DUMMY_REGION):
        self._server = server
        self.host = host
        self.port = port
        self.region = region
        self.endpoint_url = f"http://{host}:{port}"
        self._stopped = False

    @property
    def env(self) -> dict[str, str]:
        return moto_env(self.endpoint_url, self.region)

    def client(self):
        """A fresh boto3 S3 client bound to this server (for setup code and tests)."""
        import boto3

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id="testing", aws_secret_access_key="testing")

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._server.stop()
        inner = getattr(self._server, "_server", None)  # ThreadedMotoServer leaves it bound
        if inner is not None:
            inner.server_close()

    def __enter__(self) -> "MotoS3Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MotoS3Server({self.endpoint_url!r}, stopped={self._stopped})"


def start_moto_s3(port: int = 0, host: str = "127.0.0.1", region: str = DUMMY_REGION) -> MotoS3Server:
    """Start moto's threaded server on ``host:port`` (0 = a free port). ~0.7 s."""
    from moto.server import ThreadedMotoServer

    for name in ("werkzeug", "moto"):
        logging.getLogger(name).setLevel(logging.ERROR)
    srv = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    srv.start()
    h, p = srv.get_host_and_port()
    return MotoS3Server(srv, host, int(p), region)


# --------------------------------------------------------------------------- survey HTTP
@dataclasses.dataclass
class FaultRule:
    """Fault injected for requests whose URL path matches ``path`` (fnmatch pattern).

    kind     "status": answer ``status`` (500/503...); "reset": drop the connection with a TCP
             RST and no response; "truncate": send the full Content-Length header but only
             ``truncate_to`` bytes of body (default: half), then close.
    times    number of matching requests that fail before the path is served normally;
             None = always fail.
    methods  HTTP methods the rule applies to.
    """

    path: str
    kind: str = "status"
    times: int | None = 1
    status: int = 503
    truncate_to: int | None = None
    methods: tuple[str, ...] = ("GET", "HEAD")
    fired: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("status", "reset", "truncate"):
            raise ValueError(f"unknown fault kind {self.kind!r}")
        self.methods = tuple(m.upper() for m in self.methods)

    def matches(self, method: str, path: str) -> bool:
        return (method in self.methods and (self.times is None or self.fired < self.times)
                and (path == self.path or fnmatch.fnmatchcase(path, self.path)))


class _SurveyHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, handler, root_dir: str, url_prefix: str):
        super().__init__(addr, handler)
        self.root_dir = os.path.abspath(root_dir)
        self.url_prefix = url_prefix
        self.lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()  # (method, path) -> n
        self.faults: list[FaultRule] = []
        self._to_reset: set[int] = set()

    def shutdown_request(self, request) -> None:
        if id(request) in self._to_reset:  # RST: no FIN handshake, linger 0
            self._to_reset.discard(id(request))
            with contextlib.suppress(OSError):
                request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_request(request)
            return
        super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _SurveyHTTPServer
    server_version = "SurveyStub/1.0"
    sys_version = ""

    def log_message(self, format, *args):  # quiet
        logging.getLogger(__name__).debug("%s " + format, self.address_string(), *args)

    def do_GET(self):
        self._serve(head=False)

    def do_HEAD(self):
        self._serve(head=True)

    # -------------------------------------------------------------- helpers
    def _send_simple(self, code: int, body: bytes = b"", head: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _file_for(self, path: str) -> str | None:
        pre = self.server.url_prefix
        if pre:
            if not (path == pre or path.startswith(pre + "/")):
                return None
            path = path[len(pre):]
        rel = posixpath.normpath(path).lstrip("/")
        if rel in ("", ".") or rel.startswith("..") or "\x00" in rel:
            return None
        full = os.path.join(self.server.root_dir, *rel.split("/"))
        if not os.path.abspath(full).startswith(self.server.root_dir + os.sep):
            return None
        return full if os.path.isfile(full) else None

    def _serve(self, head: bool) -> None:
        srv = self.server
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        method = self.command.upper()
        with srv.lock:
            srv.counts[(method, path)] += 1
            rule = next((r for r in srv.faults if r.matches(method, path)), None)
            if rule is not None:
                rule.fired += 1
        if rule is not None and rule.kind == "status":
            self._send_simple(rule.status, f"injected fault {rule.status}\n".encode(), head)
            return
        if rule is not None and rule.kind == "reset":
            srv._to_reset.add(id(self.request))
            self.close_connection = True
            return
        full = self._file_for(path)
        if full is None:
            self._send_simple(404, b"not found\n", head)
            return
        st = os.stat(full)
        size = st.st_size
        etag = '"%s"' % hashlib.md5(f"{st.st_mtime_ns}-{size}-{path}".encode()).hexdigest()
        start, end, code = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and "," not in rng and rule is None:
            a, _, b = rng[6:].strip().partition("-")
            try:
                if a == "":
                    start, end = max(0, size - int(b)), size - 1
                else:
                    start, end = int(a), (min(int(b), size - 1) if b else size - 1)
            except ValueError:
                start, end = 0, size - 1
            if start > end or start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            code = 206
        length = end - start + 1 if size else 0
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        if rule is not None and rule.kind == "truncate":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if head:
            return
        to_send = length
        if rule is not None and rule.kind == "truncate":
            to_send = rule.truncate_to if rule.truncate_to is not None else length // 2
            to_send = max(0, min(to_send, length - 1))
        try:
            with open(full, "rb") as f:
                f.seek(start)
                while to_send > 0:
                    chunk = f.read(min(1024 * 1024, to_send))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    to_send -= len(chunk)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class SurveyHTTPServer:
    """Handle on a running survey file server.

    ``.base_url`` (no trailing slash), ``.url_for(relpath)``, ``.count(path_or_url, method=None)``,
    ``.counts`` (Counter of (method, path)), ``.total_requests()``, ``.reset_counts()``,
    ``.add_fault(rule)`` / ``.clear_faults()``, ``.stop()``; also a context manager.
    """

    def __init__(self, httpd: _SurveyHTTPServer, thread: threading.Thread):
        self._httpd = httpd
        self._thread = thread
        self.host, self.port = httpd.server_address[:2]
        self.root_dir = httpd.root_dir
        self.base_url = f"http://{self.host}:{self.port}{httpd.url_prefix}"
        self._stopped = False

    # ---------------------------------------------------------------- URLs / counters
    def url_for(self, relpath: str) -> str:
        return self.base_url + "/" + relpath.lstrip("/")

    def _path_of(self, path_or_url: str) -> str:
        if "://" in path_or_url:
            return urllib.parse.unquote(urllib.parse.urlsplit(path_or_url).path)
        if not path_or_url.startswith("/"):  # relative to base_url
            return self._httpd.url_prefix + "/" + path_or_url
        return path_or_url

    def count(self, path_or_url: str, method: str | None = None) -> int:
        """Requests received for a URL, an absolute URL path, or a path relative to base_url."""
        path = self._path_of(path_or_url)
        with self._httpd.lock:
            return sum(n for (m, p), n in self._httpd.counts.items()
                       if p == path and (method is None or m == method.upper()))

    @property
    def counts(self) -> collections.Counter:
        with self._httpd.lock:
            return collections.Counter(self._httpd.counts)

    def total_requests(self, method: str | None = None) -> int:
        with self._httpd.lock:
            return sum(n for (m, _), n in self._httpd.counts.items() if method is None or m == method.upper())

    def reset_counts(self) -> None:
        with self._httpd.lock:
            self._httpd.counts.clear()

    # ---------------------------------------------------------------- faults
    def add_fault(self, rule: FaultRule | None = None, **kwargs) -> FaultRule:
        """Add a FaultRule (or build one from kwargs; ``path`` may be relative to base_url)."""
        if rule is None:
            rule = FaultRule(**kwargs)
        rule.path = self._path_of(rule.path)
        with self._httpd.lock:
            self._httpd.faults.append(rule)
        return rule

    def clear_faults(self) -> None:
        with self._httpd.lock:
            self._httpd.faults.clear()

    # ---------------------------------------------------------------- lifecycle
    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "SurveyHTTPServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SurveyHTTPServer({self.base_url!r}, root={self.root_dir!r})"


def start_survey_http_server(root_dir: str | os.PathLike, port: int = 0, faults: Iterable[FaultRule] | None = None,
                             host: str = "127.0.0.1", url_prefix: str = "") -> SurveyHTTPServer:
    """Serve ``root_dir`` over HTTP on ``host:port`` (0 = free port) in a daemon thread.

    A file ``root_dir/south/coadd/000/0001m002/x.fits.fz`` is at
    ``<base_url>/south/coadd/000/0001m002/x.fits.fz``; ``url_prefix`` (e.g. "/dr10") is
    prepended to every URL path.  ``faults``: FaultRule list (paths relative to base_url or
    absolute URL paths).
    """
    url_prefix = ("/" + url_prefix.strip("/")) if url_prefix.strip("/") else ""
    httpd = _SurveyHTTPServer((host, port), _Handler, os.fspath(root_dir), url_prefix)
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         name=f"survey-http-{httpd.server_address[1]}", daemon=True)
    t.start()
    handle = SurveyHTTPServer(httpd, t)
    for r in faults or ():
        handle.add_fault(r)
    return handle


# --------------------------------------------------------------------------- flaky S3 proxy
class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, handler, upstream: tuple, schedule, stall_seconds: float,
                 latency_seconds: float = 0.0):
        super().__init__(addr, handler)
        self.upstream = upstream
        self.schedule = schedule
        self.stall_seconds = float(stall_seconds)
        self.latency_seconds = float(latency_seconds)
        self.lock = threading.Lock()
        self.seen: collections.Counter = collections.Counter()   # request key -> attempts
        self.injected: collections.Counter = collections.Counter()  # fault kind -> count
        self.requests = 0
        self._to_reset: set[int] = set()
        self.closing = threading.Event()

    def shutdown_request(self, request) -> None:
        if id(request) in self._to_reset:  # RST: no FIN handshake, linger 0
            self._to_reset.discard(id(request))
            with contextlib.suppress(OSError):
                request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_request(request)
            return
        super().shutdown_request(request)


_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b'<Message>Please reduce your request rate. (injected by FaultyS3Proxy)</Message>'
             b'<RequestId>FAULTPROXY</RequestId></Error>')


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, format, *args):  # quiet
        logging.getLogger(__name__).debug("proxy %s " + format, self.address_string(), *args)

    def do_GET(self):
        self._relay()

    def do_HEAD(self):
        self._relay()

    def do_PUT(self):
        self._relay()

    def do_POST(self):
        self._relay()

    def do_DELETE(self):
        self._relay()

    def _relay(self) -> None:
        import http.client

        srv = self.server
        body = b""
        if self.headers.get("Content-Length"):
            body = self.rfile.read(int(self.headers["Content-Length"]))
        key = (self.command, self.path, self.headers.get("Range", ""))
        with srv.lock:
            attempt = srv.seen[key]
            srv.seen[key] += 1
            srv.requests += 1
            kind = srv.schedule(self.command, self.path, self.headers.get("Range", ""), attempt)
            if kind:
                srv.injected[kind] += 1
        if kind == "slowdown":
            self.send_response(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(_SLOWDOWN)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(_SLOWDOWN)
            return
        if kind == "reset":
            srv._to_reset.add(id(self.request))
            self.close_connection = True
            return
        if kind == "timeout":      # no answer until the client gives up (read timeout)
            srv.closing.wait(srv.stall_seconds)
            srv._to_reset.add(id(self.request))
            self.close_connection = True
            return
        if srv.latency_seconds > 0:      # S3's time to first byte (~20-50 ms per GET)
            srv.closing.wait(srv.latency_seconds)
        conn = http.client.HTTPConnection(*srv.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("connection", "keep-alive", "proxy-connection")}
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in ("connection", "keep-alive", "transfer-encoding",
                                     "content-length", "server", "date"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD" and data:
                if kind == "cut":          # headers promise more: the body stops half-way
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    srv._to_reset.add(id(self.request))
                    self.close_connection = True
                    return
                self.wfile.write(data)
        finally:
            conn.close()


def hashed_fault_schedule(rates: Mapping[str, float], seed: int = 0, methods=("GET", "HEAD")):
    """A deterministic fault schedule for :class:`FaultyS3Proxy`: the FIRST attempt of a
    request (method, path, Range) is given fault ``kind`` when blake2b(seed | request) falls
    in that kind's share of [0, 1) (``rates``: kind -> fraction, kinds "slowdown", "reset",
    "timeout", "cut"); every retry of it is relayed.  The same requests fail whatever the
    timing or the order of the requests, and every request succeeds on its second attempt."""
    kinds = [(k, float(v)) for k, v in sorted(rates.items()) if v > 0]

    def schedule(method, path, rng, attempt):
        if attempt or method not in methods:
            return None
        h = hashlib.blake2b(f"{seed}|{method}|{path}|{rng}".encode(), digest_size=8).digest()
        u = int.from_bytes(h, "little") / 2.0 ** 64
        acc = 0.0
        for k, v in kinds:
            acc += v
            if u < acc:
                return k
        return None
    return schedule


class FaultyS3Proxy:
    """A fault-injecting HTTP proxy on 127.0.0.1 in front of a local S3 endpoint (moto).

    Requests are relayed to ``upstream_url``; ``schedule(method, path, range, attempt)``
    (attempt = how often this exact request was seen before) returns None (relay) or a fault:
    "slowdown" (HTTP 503 SlowDown, S3's throttling answer), "reset" (TCP RST, no answer),
    "timeout" (no answer for ``stall_seconds``, then RST: the client's read timeout must be
    shorter), "cut" (full headers, half the body, RST).  ``schedule`` None: no faults.
    ``latency_seconds``: every relayed request waits this long first (the ~20-50 ms S3
    takes to answer a GET, which a local moto server does not).  ``injected`` counts the
    faults given, ``requests`` all requests.  ``endpoint_url`` replaces the upstream's in the
    clients' environment (``AWS_ENDPOINT_URL``).  Use as a context manager or ``stop()``.
    """

    def __init__(self, upstream_url: str, schedule=None, *, stall_seconds: float = 3.0,
                 latency_seconds: float = 0.0, host: str = "127.0.0.1", port: int = 0):
        u = urllib.parse.urlsplit(upstream_url)
        if schedule is None:
            def schedule(method, path, rng, attempt):
                return None
        self._httpd = _ProxyServer((host, port), _ProxyHandler, (u.hostname, u.port or 80),
                                   schedule, stall_seconds, latency_seconds)
        self.endpoint_url = f"http://{host}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True,
                                        name=f"faulty-s3-{self._httpd.server_address[1]}")
        self._thread.start()

    @property
    def injected(self) -> dict:
        with self._httpd.lock:
            return dict(self._httpd.injected)

    @property
    def requests(self) -> int:
        return self._httpd.requests

    def stop(self) -> None:
        self._httpd.closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "FaultyS3Proxy":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
