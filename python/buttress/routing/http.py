"""httpx transports that spread requests over the backends of a ``LoadBalancer`` (the ``http``
extra): a real ``httpx.Client(transport=BalancedTransport(lb))`` sends each request to a backend
the balancer picks, records failures (so failing backends are ejected), and retries another
backend when that is safe.

>>> lb = LoadBalancer(["http://127.0.0.1:8001", "http://127.0.0.1:8002"])
>>> client = httpx.Client(transport=BalancedTransport(lb), base_url="http://service")
"""

from __future__ import annotations

try:
    import httpx
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "buttress.routing.http needs httpx; install it with `pip install 'buttress[http]'`."
    ) from error

from collections.abc import Callable, Collection

from buttress.routing.balancer import LoadBalancer

__all__ = ["AsyncBalancedTransport", "BalancedTransport"]

# Retried on another backend whatever happened: they change nothing on the server.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Answers that mean "this backend is in trouble": counted as failures and retried elsewhere.
FAILURE_STATUSES = frozenset({502, 503, 504})


def _routed(request: httpx.Request, backend: str) -> httpx.Request:
    """The request sent to the backend: its scheme, host and port, and its path (if any) in
    front of the request's."""
    target = httpx.URL(backend)
    url = request.url.copy_with(scheme=target.scheme, host=target.host, port=target.port)
    prefix = target.path.rstrip("/")
    if prefix:
        url = url.copy_with(path=prefix + request.url.path)
    return httpx.Request(
        request.method,
        url,
        headers=request.headers,
        stream=request.stream,
        extensions=request.extensions,
    )


def _may_retry(request: httpx.Request, error: Exception | None) -> bool:
    # A connection that never opened sent nothing, so any method may go elsewhere.
    return request.method in IDEMPOTENT or isinstance(
        error, (httpx.ConnectError, httpx.ConnectTimeout)
    )


class _Policy:
    """What both transports share: the balancer, the retry budget, the failing statuses."""

    def __init__(
        self, balancer: LoadBalancer[str], retries: int, failure_statuses: Collection[int]
    ) -> None:
        if not isinstance(balancer, LoadBalancer):
            raise TypeError(f"balancer must be a buttress LoadBalancer (got {balancer!r}).")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a whole number of at least 0 (got {retries!r}).")
        self.balancer = balancer
        self.retries = retries
        self.failure_statuses = frozenset(failure_statuses)


class BalancedTransport(_Policy, httpx.BaseTransport):
    """Sends each request to a backend (a base URL such as ``"http://10.0.0.7:8080"``) that
    ``balancer`` picks. A connection error, a timeout or a 502/503/504 counts as a failure of
    that backend and, when safe, the request goes to another one, up to ``retries`` times. A
    request with a key for a ``hash`` balancer carries it in ``extensions={"balancer_key": ...}``.
    """

    def __init__(
        self,
        balancer: LoadBalancer[str],
        *,
        retries: int = 2,
        failure_statuses: Collection[int] = FAILURE_STATUSES,
        transport: Callable[[], httpx.BaseTransport] = httpx.HTTPTransport,
    ) -> None:
        super().__init__(balancer, retries, failure_statuses)
        # One transport (and its connection pool) for every backend.
        self._transport = transport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.retries:
            request.read()  # a body sent once may have to be sent again
        key = request.extensions.get("balancer_key")
        last_error: Exception | None = None
        for attempt in range(self.retries + 1):
            pick = self.balancer.pick(key)
            try:
                response = self._transport.handle_request(_routed(request, pick.backend))
            except httpx.TransportError as error:
                pick.release(failed=True)
                last_error = error
                if attempt < self.retries and _may_retry(request, error):
                    continue
                raise
            except BaseException:
                pick._end(None)  # not the backend's doing: neither success nor failure
                raise
            failed = response.status_code in self.failure_statuses
            pick.release(failed=failed)
            if failed and attempt < self.retries and _may_retry(request, None):
                response.close()
                continue
            return response
        assert last_error is not None
        raise last_error

    def close(self) -> None:
        self._transport.close()


class AsyncBalancedTransport(_Policy, httpx.AsyncBaseTransport):
    """The asyncio twin of ``BalancedTransport``, for ``httpx.AsyncClient``."""

    def __init__(
        self,
        balancer: LoadBalancer[str],
        *,
        retries: int = 2,
        failure_statuses: Collection[int] = FAILURE_STATUSES,
        transport: Callable[[], httpx.AsyncBaseTransport] = httpx.AsyncHTTPTransport,
    ) -> None:
        super().__init__(balancer, retries, failure_statuses)
        self._async_transport = transport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.retries:
            await request.aread()
        key = request.extensions.get("balancer_key")
        last_error: Exception | None = None
        for attempt in range(self.retries + 1):
            pick = self.balancer.pick(key)
            try:
                response = await self._async_transport.handle_async_request(
                    _routed(request, pick.backend)
                )
            except httpx.TransportError as error:
                pick.release(failed=True)
                last_error = error
                if attempt < self.retries and _may_retry(request, error):
                    continue
                raise
            except BaseException:
                pick._end(None)  # cancelled: says nothing about the backend
                raise
            failed = response.status_code in self.failure_statuses
            pick.release(failed=failed)
            if failed and attempt < self.retries and _may_retry(request, None):
                await response.aclose()
                continue
            return response
        assert last_error is not None
        raise last_error

    async def aclose(self) -> None:
        await self._async_transport.aclose()
