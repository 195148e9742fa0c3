"""The httpx transports over real HTTP servers on 127.0.0.1: requests spread over the backends,
retries around a server that answers 503 and a port that refuses connections, which methods may
be retried and with their body intact, hash keys, the asyncio twin under concurrency, errors
once nothing answers, and active health checks made with httpx.

Every server is a ``ThreadingHTTPServer`` on an ephemeral port, in a daemon thread, started and
shut down by a fixture; it answers ``/who`` with its name and ``/echo`` with the body it got,
and logs every request it received. A refusing backend is a port bound but not listening.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from buttress import LoadBalancer, ManualClock, NoHealthyBackendError
from buttress.routing.http import AsyncBalancedTransport, BalancedTransport
from support import JOIN, cancel, until

BASE = "http://service"  # the clients' base URL: the transport replaces its host and port
BODY = bytes(range(256)) * 400  # 100 KiB, every byte value


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in two writes: no delayed-ACK stall
    server: _HTTPServer

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return body
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _answer(self) -> None:
        server = self.server.owner
        body = self._body()
        server.log(self.command, self.path, body)
        if self.path == "/slow":
            server.release_slow.wait(JOIN)
        payload = server.name.encode() if self.path in ("/who", "/slow") else body
        if server.status != 200:
            payload = b"busy"
        self.send_response(server.status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("X-Server", server.name)
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # 50 concurrent connects overflow the default backlog of 5
    owner: Server

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that went away (a cancelled request) is no error of the server's.
        pass


class Server:
    """One HTTP server named `name` that answers every request with `status`."""

    def __init__(self, name: str, status: int = 200) -> None:
        self.name = name
        self.status = status
        self.requests: list[tuple[str, str, bytes]] = []
        self.release_slow = threading.Event()
        self._lock = threading.Lock()
        self._httpd = _HTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.owner = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=f"http-{name}",
            daemon=True,
        )
        self._thread.start()

    def log(self, method: str, path: str, body: bytes) -> None:
        with self._lock:
            self.requests.append((method, path, body))

    def paths(self) -> list[str]:
        with self._lock:
            return [path for _, path, _ in self.requests]

    def stop(self) -> None:
        self.release_slow.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(JOIN)


class Servers:
    """Three healthy servers a, b and c, and `busy`, which answers 503 to everything."""

    def __init__(self) -> None:
        self.a = Server("a")
        self.b = Server("b")
        self.c = Server("c")
        self.busy = Server("busy", 503)
        self.healthy = [self.a, self.b, self.c]
        self.by_url = {server.url: server for server in [*self.healthy, self.busy]}

    def name_of(self, url: str) -> str:
        return self.by_url[url].name


@pytest.fixture
def servers() -> Iterator[Servers]:
    started = Servers()
    yield started
    for server in [*started.healthy, started.busy]:
        server.stop()


@pytest.fixture
def refused() -> Iterator[Callable[[], str]]:
    """Makes URLs of ports that refuse connections: bound, so no one else takes them, but not
    listening."""
    sockets: list[socket.socket] = []

    def make() -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield make
    for sock in sockets:
        sock.close()


def client_for(lb: LoadBalancer[str], **options: object) -> httpx.Client:
    return httpx.Client(transport=BalancedTransport(lb, **options), base_url=BASE)  # type: ignore[arg-type]


def async_client_for(lb: LoadBalancer[str], **options: object) -> httpx.AsyncClient:
    transport = AsyncBalancedTransport(lb, **options)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url=BASE)


def by_url(lb: LoadBalancer[str]) -> dict[str, tuple[int, int, int, int]]:
    """(in_flight, successes, failures, ejections) of every backend."""
    return {
        status.backend: (status.in_flight, status.successes, status.failures, status.ejections)
        for status in lb.statuses()
    }


def assert_idle(lb: LoadBalancer[str]) -> None:
    assert [status.in_flight for status in lb.statuses()] == [0] * len(lb)


# ---- spreading and retrying --------------------------------------------------------------


def test_round_robin_spreads_requests_over_the_servers(servers: Servers) -> None:
    lb = LoadBalancer([server.url for server in servers.healthy])
    with client_for(lb) as client:
        responses = [client.get("/who") for _ in range(30)]
    assert [response.status_code for response in responses] == [200] * 30
    assert [response.text for response in responses] == ["a", "b", "c"] * 10
    for server in servers.healthy:
        assert server.paths() == ["/who"] * 10
        assert lb.status(server.url).successes == 10
    assert_idle(lb)


def test_retries_route_around_a_503_server_and_a_refused_port(
    servers: Servers, refused: Callable[[], str]
) -> None:
    closed = refused()
    backends = [servers.a.url, servers.busy.url, closed, servers.b.url, servers.c.url]
    lb = LoadBalancer(backends, consecutive_failures=5, clock=ManualClock())
    with client_for(lb) as client:
        responses = [client.get("/who") for _ in range(100)]
    assert Counter(response.status_code for response in responses) == {200: 100}
    names = Counter(response.text for response in responses)
    assert set(names) == {"a", "b", "c"}
    assert min(names.values()) >= 25
    stats = by_url(lb)
    assert stats[servers.busy.url] == (0, 0, 5, 1)  # ejected after 5 failures in a row
    assert stats[closed][2:] == (5, 1)
    assert not lb.status(servers.busy.url).available
    assert not lb.status(closed).available
    assert len(servers.busy.requests) == 5
    for server in servers.healthy:
        assert stats[server.url][2:] == (0, 0)
    assert_idle(lb)


def test_post_to_a_refusing_backend_goes_elsewhere_with_its_body(
    servers: Servers, refused: Callable[[], str]
) -> None:
    closed = refused()
    lb = LoadBalancer([closed, servers.a.url])
    with client_for(lb) as client:
        response = client.post("/echo", content=BODY)
    assert response.status_code == 200
    assert response.headers["X-Server"] == "a"
    assert response.content == BODY
    assert servers.a.requests == [("POST", "/echo", BODY)]
    assert by_url(lb) == {closed: (0, 0, 1, 0), servers.a.url: (0, 1, 0, 0)}


def test_post_that_got_a_503_is_not_retried(servers: Servers) -> None:
    lb = LoadBalancer([servers.busy.url, servers.a.url])
    with client_for(lb) as client:
        response = client.post("/echo", content=b"order-42")
    assert response.status_code == 503
    assert response.headers["X-Server"] == "busy"
    assert servers.busy.requests == [("POST", "/echo", b"order-42")]
    assert servers.a.requests == []
    assert by_url(lb) == {servers.busy.url: (0, 0, 1, 0), servers.a.url: (0, 0, 0, 0)}


def test_idempotent_requests_that_got_a_503_are_retried_with_their_body(
    servers: Servers,
) -> None:
    lb = LoadBalancer([servers.busy.url, servers.a.url])
    with client_for(lb) as client:
        got = client.get("/who")  # busy, then a
        put = client.put("/echo", content=BODY)  # busy again, then a
    assert (got.status_code, got.text) == (200, "a")
    assert (put.status_code, put.content) == (200, BODY)
    assert servers.busy.requests == [("GET", "/who", b""), ("PUT", "/echo", BODY)]
    assert servers.a.requests == [("GET", "/who", b""), ("PUT", "/echo", BODY)]
    assert_idle(lb)


def test_a_streamed_put_that_got_a_503_is_retried_with_its_body(servers: Servers) -> None:
    """PUT is idempotent, so a 503 sends it to the next backend; its body must go along.

    The transport buffers the body only for methods it does not count as idempotent, so a
    streamed PUT body was spent on the first backend: httpx raises StreamConsumed on the retry
    (and, being no TransportError, it also leaves the second backend one call in flight)."""

    def chunks() -> Iterator[bytes]:
        yield BODY[:1000]
        yield BODY[1000:]

    lb = LoadBalancer([servers.busy.url, servers.a.url])
    with client_for(lb) as client:
        response = client.put("/echo", content=chunks())
    assert (response.status_code, response.content) == (200, BODY)
    assert servers.a.requests == [("PUT", "/echo", BODY)]
    assert_idle(lb)


def test_an_unexpected_error_from_the_inner_transport_releases_the_pick(
    servers: Servers,
) -> None:
    """Whatever the wrapped transport raises, the pick must be released. BalancedTransport
    releases it only on httpx.TransportError (AsyncBalancedTransport on anything), so any other
    error leaves the backend counted in flight for good."""

    def explode(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug in the inner transport")

    lb = LoadBalancer([servers.a.url, servers.b.url])
    transport = BalancedTransport(lb, transport=lambda: httpx.MockTransport(explode))
    with (
        httpx.Client(transport=transport, base_url=BASE) as client,
        pytest.raises(RuntimeError, match="inner transport"),
    ):
        client.get("/who")
    assert_idle(lb)


def test_the_hash_key_keeps_a_user_on_one_server(servers: Servers) -> None:
    lb = LoadBalancer([server.url for server in servers.healthy], algorithm="hash")
    home = servers.name_of(lb.choose("user-1"))
    with client_for(lb) as client:
        names = {client.get("/who", extensions={"balancer_key": "user-1"}).text for _ in range(20)}
        spread = {
            client.get("/who", extensions={"balancer_key": f"user-{n}"}).text for n in range(60)
        }
        with pytest.raises(TypeError, match="key must be given"):
            client.get("/who")
    assert names == {home}
    assert spread == {"a", "b", "c"}
    assert_idle(lb)


# ---- asyncio -------------------------------------------------------------------------------


async def test_async_transport_spreads_and_retries_concurrently(
    servers: Servers, refused: Callable[[], str]
) -> None:
    closed = refused()
    backends = [servers.a.url, servers.busy.url, closed, servers.b.url, servers.c.url]
    # Ejected at the first failure: a retry never meets a backend that already failed it.
    lb = LoadBalancer(backends, consecutive_failures=1, clock=ManualClock())
    async with async_client_for(lb) as client:
        responses = await asyncio.gather(*(client.get("/who") for _ in range(50)))
    assert Counter(response.status_code for response in responses) == {200: 50}
    names = Counter(response.text for response in responses)
    assert set(names) == {"a", "b", "c"}
    stats = by_url(lb)
    assert stats[servers.busy.url][3] == 1
    assert stats[closed][3] == 1
    assert not lb.status(servers.busy.url).available
    assert not lb.status(closed).available
    assert sum(stats[server.url][1] for server in servers.healthy) == 50
    assert_idle(lb)


async def test_async_post_retries_only_a_connection_that_never_opened(
    servers: Servers, refused: Callable[[], str]
) -> None:
    closed = refused()
    lb = LoadBalancer([closed, servers.a.url, servers.busy.url])
    async with async_client_for(lb) as client:
        moved = await client.post("/echo", content=BODY)  # refused, then a
        kept = await client.post("/echo", content=b"order-42")  # busy: 503, not retried
    assert (moved.status_code, moved.headers["X-Server"], moved.content) == (200, "a", BODY)
    assert (kept.status_code, kept.headers["X-Server"]) == (503, "busy")
    assert servers.a.requests == [("POST", "/echo", BODY)]
    assert servers.busy.requests == [("POST", "/echo", b"order-42")]
    assert_idle(lb)


async def test_async_hash_key_keeps_a_user_on_one_server(servers: Servers) -> None:
    lb = LoadBalancer([server.url for server in servers.healthy], algorithm="hash")
    home = servers.name_of(lb.choose("user-1"))
    async with async_client_for(lb) as client:
        responses = await asyncio.gather(
            *(client.get("/who", extensions={"balancer_key": "user-1"}) for _ in range(20))
        )
    assert {response.text for response in responses} == {home}
    assert_idle(lb)


async def test_async_cancelled_request_is_released_and_not_a_failure(servers: Servers) -> None:
    lb = LoadBalancer([servers.a.url], consecutive_failures=1)
    async with async_client_for(lb) as client:
        task = asyncio.create_task(client.get("/slow"))
        await until(lambda: servers.a.paths() == ["/slow"])
        assert lb.status(servers.a.url).in_flight == 1
        await cancel(task)
        servers.a.release_slow.set()
        status = lb.status(servers.a.url)
        assert (status.in_flight, status.failures, status.ejections) == (0, 0, 0)
        assert (await client.get("/who")).text == "a"


# ---- nothing answers -----------------------------------------------------------------------


def test_connect_error_propagates_after_the_retries(refused: Callable[[], str]) -> None:
    backends = [refused() for _ in range(4)]
    lb = LoadBalancer(backends, consecutive_failures=None)
    with client_for(lb, retries=2) as client, pytest.raises(httpx.ConnectError):
        client.get("/who")
    assert [status.failures for status in lb.statuses()] == [1, 1, 1, 0]  # 1 try + 2 retries
    assert_idle(lb)


def test_no_healthy_backend_once_all_are_ejected(refused: Callable[[], str]) -> None:
    backends = [refused() for _ in range(3)]
    lb = LoadBalancer(backends, name="api", consecutive_failures=1, clock=ManualClock())
    with client_for(lb) as client:
        with pytest.raises(httpx.ConnectError):
            client.post("/echo", content=b"x")  # refused three times, each backend ejected
        with pytest.raises(NoHealthyBackendError, match="'api'") as raised:
            client.get("/who")
    assert raised.value.backends == 3
    assert [status.ejections for status in lb.statuses()] == [1, 1, 1]
    assert_idle(lb)


async def test_async_connect_error_then_no_healthy_backend(refused: Callable[[], str]) -> None:
    backends = [refused() for _ in range(3)]
    lb = LoadBalancer(backends, consecutive_failures=1, clock=ManualClock())
    async with async_client_for(lb) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("/who")
        with pytest.raises(NoHealthyBackendError):
            await client.get("/who")
    assert_idle(lb)


def test_retries_zero_sends_once(servers: Servers) -> None:
    lb = LoadBalancer([servers.busy.url, servers.a.url])
    with client_for(lb, retries=0) as client:
        assert client.get("/who").status_code == 503
    assert servers.a.requests == []


# ---- active health checks ------------------------------------------------------------------


def test_active_health_checks_with_httpx(servers: Servers, refused: Callable[[], str]) -> None:
    closed = refused()

    def check(backend: str) -> bool:
        return httpx.get(f"{backend}/who", timeout=JOIN).status_code == 200  # raises if refused

    lb = LoadBalancer(
        [servers.a.url, servers.busy.url, closed],
        health_check=check,
        unhealthy_threshold=2,
        healthy_threshold=1,
        consecutive_failures=None,
    )
    lb.check_health()
    assert all(status.healthy for status in lb.statuses())
    lb.check_health()
    assert [status.healthy for status in lb.statuses()] == [True, False, False]
    with client_for(lb) as client:
        assert {client.get("/who").text for _ in range(6)} == {"a"}
    servers.busy.status = 200
    lb.check_health()
    assert [status.healthy for status in lb.statuses()] == [True, True, False]


async def test_async_active_health_checks_with_httpx(
    servers: Servers, refused: Callable[[], str]
) -> None:
    closed = refused()
    async with httpx.AsyncClient(timeout=JOIN) as checker:

        async def check(backend: str) -> bool:
            return (await checker.get(f"{backend}/who")).status_code == 200

        lb = LoadBalancer(
            [servers.a.url, servers.busy.url, closed, servers.b.url],
            health_check=check,
            unhealthy_threshold=1,
        )
        await lb.check_health_async()
    assert [status.healthy for status in lb.statuses()] == [True, False, False, True]
    async with async_client_for(lb) as client:
        responses = await asyncio.gather(*(client.get("/who") for _ in range(10)))
    assert Counter(response.text for response in responses) == {"a": 5, "b": 5}


# ---- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", [BalancedTransport, AsyncBalancedTransport])
def test_transports_refuse_bad_input(transport: type) -> None:
    lb = LoadBalancer(["http://127.0.0.1:1"])
    with pytest.raises(TypeError, match="balancer"):
        transport(["http://127.0.0.1:1"])
    for retries in (-1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="retries"):
            transport(lb, retries=retries)
