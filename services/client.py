"""The HTTP client of the commands that talk to a running noisewise service.

``noisewise demo``, ``noisewise recalibrate --url`` and ``noisewise audit submit`` each open one
:class:`ServiceClient` (one :class:`httpx.Client`, so one connection pool) for the whole command. It

- sends ``Authorization: Bearer KEY`` when a key is given (``--api-key``, default the ``NOISEWISE_API_KEY``
  environment variable). The key never appears in an error message or in ``--help``;
- retries with exponential backoff (:data:`TRIES` tries, waits of :data:`BACKOFF_S` doubling, at most
  :data:`MAX_WAIT_S` of waiting in all) when the connection is refused or reset and when the service answers
  503 (starting up, reloading, overloaded): a service that is restarting is waited for, a dead one is reported
  within seconds;
- reports failure in one line naming the URL and the cause (:class:`ServiceError`), and a 401/403 in one
  line saying how to pass a key.

A reset after the request was sent may mean the service acted on it, so such a request is repeated only when
it is idempotent (``/model``, ``/reload``, and ``/feedback``, whose repeats come back as duplicates); a
``/predict`` is repeated only when it never reached the service (connection refused, or a 503).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # httpx is imported when a client is made, so that `noisewise --help` stays quick
    import httpx

    from noisewise.services.auth import AuthConfig

#: Environment variable holding the key the commands send (the service reads its keys from NOISEWISE_API_KEYS).
API_KEY_ENV = "NOISEWISE_API_KEY"
#: Tries per request (the first one included).
TRIES = 5
#: Wait before the second try; it doubles before each further try.
BACKOFF_S = 0.5
#: Most seconds spent waiting between the tries of one request (the last wait is shortened to fit).
MAX_WAIT_S = 10.0
#: Statuses that mean "not now, try again": the service did not act on the request.
RETRY_STATUSES = frozenset({503})
#: Statuses that mean the key is missing or refused.
AUTH_STATUSES = frozenset({401, 403})

_KEY_CHARS = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII, as the service accepts


class ServiceError(Exception):
    """The service could not be used; the message is one line for ``noisewise: error: ...``. ``unreachable``:
    no usable answer came (connection failed, or 503 until the last try), as opposed to a refused key."""

    def __init__(self, message: str, *, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


def add_api_key_option(parser) -> None:
    """Add ``--api-key`` to a command's argparse parser. Absent when not given (read it with
    ``getattr(args, "api_key", None)``): :func:`resolve_api_key` then reads the environment, so the key is
    never shown as a default in ``--help``."""
    import argparse

    parser.add_argument(
        "--api-key", default=argparse.SUPPRESS, metavar="KEY",
        help=f"API key sent as `Authorization: Bearer KEY` to a service with keys configured (default: the "
        f"{API_KEY_ENV} environment variable, which keeps the key out of shell history and process lists)")


def resolve_api_key(api_key: str | None, env: dict | None = None) -> str | None:
    """The key to send: ``api_key`` when given, else ``$NOISEWISE_API_KEY``; None when neither is set.

    Raises :class:`ServiceError` (without echoing the key) when it has characters an HTTP header cannot carry.
    """
    env = os.environ if env is None else env
    key = (env.get(API_KEY_ENV, "") if api_key is None else api_key).strip()
    if not key:
        return None
    if not _KEY_CHARS.match(key):
        raise ServiceError(f"--api-key / {API_KEY_ENV}: the key has characters other than visible ASCII "
                           "(spaces, control or non-ASCII characters); keys are made by "
                           "`python -m noisewise.services.auth new`")
    return key


def backoff_delays(tries: int = TRIES, backoff_s: float = BACKOFF_S, max_wait_s: float = MAX_WAIT_S) -> list[float]:
    """The waits between ``tries`` tries: ``backoff_s * 2**i`` for ``i = 0 .. tries - 2``, cut so that they sum
    to at most ``max_wait_s`` (waits that no longer fit are dropped, so there are fewer tries)."""
    if tries < 1:
        raise ValueError(f"tries: expected at least 1, got {tries}")
    if backoff_s < 0 or max_wait_s < 0:
        raise ValueError(f"backoff_s and max_wait_s: expected >= 0, got {backoff_s} and {max_wait_s}")
    delays, left = [], float(max_wait_s)
    for i in range(tries - 1):
        wait = min(backoff_s * 2 ** i, left)
        if wait <= 0 and backoff_s > 0:
            break
        delays.append(wait)
        left -= wait
    return delays


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


def _cause(err: Exception) -> str:
    text = _one_line(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class ServiceClient:
    """One command's connection to a noisewise service: ``Authorization`` header, retries, one-line errors.

    Parameters
    ----------
    url : str
        The service, ``http(s)://HOST:PORT``; request paths are relative to it.
    api_key : str or None
        Key to send; None: ``$NOISEWISE_API_KEY`` (see :func:`resolve_api_key`); "" sends none.
    timeout : float
        Seconds per try (reading the answer included).
    tries, backoff_s, max_wait_s : int, float, float
        Retry schedule (see :func:`backoff_delays`); the module constants by default.
    transport : httpx.BaseTransport or None
        For tests (an :class:`httpx.MockTransport`); None: the network.
    sleep : callable
        How to wait (tests record the waits instead).

    Use it as a context manager; :meth:`request` returns every answer except a 401/403 and a 503 after the
    last try, which raise :class:`ServiceError`, as does a connection failure.
    """

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 120.0, tries: int | None = None,
                 backoff_s: float | None = None, max_wait_s: float | None = None, transport=None,
                 sleep: Callable[[float], None] = time.sleep):
        import httpx

        url = (url or "").strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ServiceError(f"--url: expected http://HOST:PORT or https://HOST, got {url[:100]!r}")
        self.url = url
        self._key = resolve_api_key(api_key)
        self._delays = backoff_delays(TRIES if tries is None else tries, BACKOFF_S if backoff_s is None else backoff_s,
                                      MAX_WAIT_S if max_wait_s is None else max_wait_s)
        self._sleep = sleep
        self.attempts = 0  # tries made by the last request (for tests and reports)
        self._stack = contextlib.ExitStack()
        # keyword arguments only, and entered as a context manager: tests may stand a TestClient in for it
        self._http = self._stack.enter_context(httpx.Client(base_url=url, timeout=timeout, transport=transport))

    @property
    def has_key(self) -> bool:
        return self._key is not None

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def post(self, path: str, json: Any = None, *, idempotent: bool = True) -> httpx.Response:
        return self.request("POST", path, json=json, idempotent=idempotent)

    def get(self, path: str, *, idempotent: bool = True) -> httpx.Response:
        return self.request("GET", path, idempotent=idempotent)

    def request(self, method: str, path: str, *, json: Any = None, idempotent: bool = True) -> httpx.Response:
        """Send one request, trying again on a refused or reset connection and on 503.

        ``idempotent=False``: a reset after the request went out is not retried (the service may have acted on
        it); a refused connection and a 503 still are.
        """
        import httpx

        target = f"{self.url}{path}"
        # connection never made: safe to repeat whatever the request; a reset mid-exchange: only if idempotent
        retried = ((httpx.ConnectError, httpx.WriteError, httpx.ReadError, httpx.RemoteProtocolError) if idempotent
                   else (httpx.ConnectError,))
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else None
        started = time.monotonic()
        self.attempts = 0
        for wait in [*self._delays, None]:
            self.attempts += 1
            try:
                response = self._http.request(method, path, json=json, headers=headers)
            except retried as err:
                cause = _cause(err)
            except (httpx.HTTPError, httpx.InvalidURL) as err:  # a timeout, a bad URL: trying again will not help
                raise ServiceError(f"{target}: {_cause(err)}", unreachable=True) from None
            else:
                if response.status_code in AUTH_STATUSES:
                    raise ServiceError(self._auth_message(target, response.status_code))
                if response.status_code not in RETRY_STATUSES:
                    return response
                cause = f"answered {response.status_code}: {_one_line(response.text) or 'no body'}"
            if wait is None:
                break
            self._sleep(wait)
        elapsed = time.monotonic() - started
        tries = f"{self.attempts} {'try' if self.attempts == 1 else 'tries'}"
        raise ServiceError(f"{target}: no usable answer after {tries} in {elapsed:.1f} s ({cause}); is the service "
                           "running at this URL?", unreachable=True)

    def _auth_message(self, target: str, status: int) -> str:
        if self._key is None:
            return (f"{target} answered {status}: the service needs an API key: pass --api-key KEY or set "
                    f"{API_KEY_ENV}")
        return (f"{target} answered {status}: the API key was not accepted: pass one of the service's keys with "
                f"--api-key or {API_KEY_ENV}")


def curl_command(base: str, path: str, config: AuthConfig, *, body: str | None = None) -> str:
    """The ``curl`` line ``noisewise serve`` prints for ``POST base + path``.

    It carries ``-H "Authorization: Bearer $NOISEWISE_API_KEY"`` (the variable, never a key: the shell
    fills it in) exactly when ``config`` requires a key for ``path``; ``body``: a JSON file sent with ``-d @``.
    """
    line = f"curl -s -X POST {base}{path}"
    if config.requires_key(path):
        line += f' -H "Authorization: Bearer ${API_KEY_ENV}"'
    if body is not None:
        line += f" -H 'Content-Type: application/json' -d @{body}"
    return line
