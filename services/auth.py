"""API-key authentication for the noisewise service: a pure ASGI middleware, keys from the environment.

Configuration (read once per start-up by :meth:`noisewise.services.settings.Settings.from_env`, which stops the
service with one line naming the variable when it is wrong):

=============================  ==========  ===========================================================
variable                       default     meaning
=============================  ==========  ===========================================================
``NOISEWISE_API_KEYS``         (none)      comma-separated plaintext keys (each at least 16 visible ASCII
                                           characters, no commas)
``NOISEWISE_API_KEYS_FILE``    (none)      a file of hashed keys, one ``sha256:<64 hex digits>`` a line;
                                           ``#`` comments and blank lines allowed
``NOISEWISE_AUTH_PREDICT``     ``0``       ``1``: ``/predict``, ``/predict_image`` and ``/model`` need a key
``NOISEWISE_AUTH_METRICS``     ``0``       ``1``: ``/metrics`` needs a key
=============================  ==========  ===========================================================

Both key sources may be set (their keys are pooled: handy while rotating). Clients send
``Authorization: Bearer KEY``. When keys are configured:

- :data:`OPEN_ROUTES` (health, OpenAPI document, docs page) never need a key; ``/metrics`` needs one
  only with ``NOISEWISE_AUTH_METRICS=1``, the :data:`PREDICT_ROUTES` only with
  ``NOISEWISE_AUTH_PREDICT=1``;
- every other path needs a key: the :data:`ADMIN_ROUTES` (``/feedback``, ``/suspects``, ``/reload``)
  and any route added later (deny by default, so a new admin route cannot ship unprotected), unknown
  paths included.

A missing, malformed or wrong key gets the same 401 (``WWW-Authenticate: Bearer``, body
``{"error": "authentication required", "detail": []}``): the answer does not say which of the three it
was, nor whether the path exists. Without keys nothing is protected and the service logs a warning at
start-up. Keys are kept only as SHA-256 digests; a presented key is hashed and compared with every
configured digest by :func:`hmac.compare_digest`, without stopping at the first match, so the time taken
does not depend on which key (if any) matched.

Making keys (a key is a secret: keep it out of shell history and process lists)::

    python -m noisewise.services.auth new            # prints a fresh key, then its line for the keys file
    python -m noisewise.services.auth hash < key.txt # one keys-file line per key read from stdin

or without noisewise installed::

    printf %s "$KEY" | sha256sum | awk '{print "sha256:" $1}' >> keys.txt

Protecting ``/metrics``: either keep it open but reachable only from the scraper (bind the server to
loopback or a private network, and put a reverse proxy with TLS and basic auth in front of it for
remote Prometheus), or set ``NOISEWISE_AUTH_METRICS=1`` and give Prometheus a key::

    scrape_configs:
      - job_name: noisewise
        authorization:
          type: Bearer
          credentials_file: /etc/prometheus/noisewise.key   # the plaintext key, one line

Health endpoints stay open for load balancers and orchestrators; they reveal only liveness.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bentoml.noisewise")  # under "bentoml" so that BentoML's server logging shows it

KEYS_ENV = "NOISEWISE_API_KEYS"
KEYS_FILE_ENV = "NOISEWISE_API_KEYS_FILE"
PREDICT_ENV = "NOISEWISE_AUTH_PREDICT"
METRICS_ENV = "NOISEWISE_AUTH_METRICS"
MIN_KEY_CHARS = 16  # a short plaintext key is guessable over the network; generated keys have 43

#: Never need a key: liveness/readiness for orchestrators, the API description and its docs page.
OPEN_ROUTES = frozenset({"/", "/healthz", "/livez", "/readyz", "/docs", "/docs.json", "/schema.json"})
#: Static assets of BentoML's docs page.
OPEN_PREFIXES = ("/static_content/", "/assets/")
#: Need a key only with NOISEWISE_AUTH_PREDICT=1.
PREDICT_ROUTES = frozenset({"/predict", "/predict_image", "/model"})
#: Needs a key only with NOISEWISE_AUTH_METRICS=1.
METRICS_ROUTE = "/metrics"
#: Always need a key when keys are configured. Documentation and tests: the middleware denies every path
#: that is not open, so a route added later is protected without being listed anywhere.
ADMIN_ROUTES = frozenset({"/feedback", "/suspects", "/reload"})

UNAUTHORIZED_BODY = b'{"error":"authentication required","detail":[]}'
_LINE = re.compile(r"^sha256:([0-9a-fA-F]{64})(?:\s+#.*)?$")
_KEY_CHARS = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII: what an HTTP header carries unmangled


def hash_api_key(key: str) -> str:
    """The keys-file line for ``key``: ``sha256:`` and the hex SHA-256 of its UTF-8 bytes."""
    if not isinstance(key, str) or not key:
        raise ValueError("key: expected a non-empty string")
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_api_key() -> str:
    """A fresh random key: 32 bytes from :mod:`secrets`, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class AuthConfig:
    """Who may call what. ``digests``: SHA-256 digests (32 bytes each) of the accepted keys; empty means
    authentication is off. ``deny_all``: the configuration could not be read: refuse every protected
    route (fail closed) until the service reports the error and stops."""

    digests: tuple[bytes, ...] = ()
    predict: bool = False
    metrics: bool = False
    deny_all: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.digests) or self.deny_all

    def requires_key(self, path: str) -> bool:
        """Whether a request for ``path`` must carry a valid key."""
        if not self.enabled:
            return False
        if path in OPEN_ROUTES or path.startswith(OPEN_PREFIXES):
            return False
        if path in PREDICT_ROUTES:
            return self.predict or self.deny_all
        if path == METRICS_ROUTE:
            return self.metrics or self.deny_all
        return True

    def accepts(self, key: str | None) -> bool:
        """Whether ``key`` is one of the configured keys, in time independent of which one it is."""
        if not key:
            return False
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        matched = False
        for expected in self.digests:
            matched |= hmac.compare_digest(digest, expected)  # `|=`, not `or`: every digest is compared
        return matched


def bearer_key(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The key of the single ``Authorization: Bearer KEY`` header, or None (none, several, other scheme)."""
    values = [value for name, value in headers if name.lower() == b"authorization"]
    if len(values) != 1:
        return None
    scheme, _, key = values[0].decode("latin-1").strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:  # RFC 6750: the scheme is case-insensitive
        return None
    return key


def auth_from_env(env: Mapping[str, str]) -> AuthConfig:
    """Read the auth settings; :class:`noisewise.services.settings.SettingsError` naming the variable if wrong."""
    from noisewise.services.settings import SettingsError

    digests: list[bytes] = []
    text = env.get(KEYS_ENV, "")
    if text.strip():
        keys = [k.strip() for k in text.split(",")]
        for i, key in enumerate(keys, start=1):
            where = f"{KEYS_ENV}: key {i} of {len(keys)}"  # never echo a key: errors end up in logs
            if not key:
                raise SettingsError(f"{where} is empty (comma-separated keys, no empty entries)")
            if not _KEY_CHARS.match(key):
                raise SettingsError(f"{where} has characters other than visible ASCII")
            if len(key) < MIN_KEY_CHARS:
                raise SettingsError(f"{where} has {len(key)} characters, at least {MIN_KEY_CHARS} are needed "
                                    "(make one with `python -m noisewise.services.auth new`)")
            digests.append(hashlib.sha256(key.encode()).digest())
    path = env.get(KEYS_FILE_ENV, "").strip()
    if path:
        digests.extend(_read_keys_file(Path(path), SettingsError))
    flags = {}
    for name in (PREDICT_ENV, METRICS_ENV):
        value = env.get(name, "").strip().lower()
        if value and value not in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
            raise SettingsError(f"{name}: expected 1/0 (or true/false, yes/no, on/off), got {value!r}")
        flags[name] = value in {"1", "true", "yes", "on"}
        if flags[name] and not digests:  # asked for protection without keys: refuse rather than run open
            raise SettingsError(f"{name}=1 needs keys: set {KEYS_ENV} or {KEYS_FILE_ENV}")
    unique = tuple(dict.fromkeys(digests))
    return AuthConfig(digests=unique, predict=flags[PREDICT_ENV], metrics=flags[METRICS_ENV])


def _read_keys_file(path: Path, error: type[Exception]) -> list[bytes]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise error(f"{KEYS_FILE_ENV}: cannot read {str(path)!r}: {reason}") from None
    digests = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:  # the line itself is not shown: it may be a plaintext key pasted by mistake
            raise error(f"{KEYS_FILE_ENV}: line {number} of {str(path)!r}: expected sha256:<64 hex digits> "
                        "(make one with `python -m noisewise.services.auth new`)")
        digests.append(bytes.fromhex(match.group(1)))
    if not digests:
        raise error(f"{KEYS_FILE_ENV}: {str(path)!r} has no keys (lines sha256:<64 hex digits>)")
    return digests


class ApiKeyAuth:
    """ASGI middleware: a request for a protected path without a valid ``Authorization: Bearer KEY`` gets
    401, before the body is read. The configuration is read again at every lifespan start-up (the app can
    be started again in tests, following the environment)."""

    def __init__(self, app, config: AuthConfig | None = None):
        self.app = app
        self._fixed = config
        self.config = config if config is not None else self._read_config(warn=False)

    @staticmethod
    def _read_config(warn: bool) -> AuthConfig:
        from noisewise.services.settings import Settings, SettingsError

        try:
            config = Settings.from_env().auth
        except SettingsError:  # reported by the service itself, in one line; meanwhile let no one in
            return AuthConfig(deny_all=True)
        if warn and not config.enabled:
            log.warning("noisewise: no API keys configured (%s or %s): /feedback, /suspects and /reload are "
                        "open to anyone who can reach this server", KEYS_ENV, KEYS_FILE_ENV)
        return config

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            self.config = self._fixed if self._fixed is not None else self._read_config(warn=True)
        elif (scope["type"] in ("http", "websocket") and self.config.requires_key(scope.get("path", ""))
              and not self.config.accepts(bearer_key(scope.get("headers") or []))):
            return await self._refuse(scope, receive, send)
        return await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope, receive, send) -> None:
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(UNAUTHORIZED_BODY)).encode()),
            (b"www-authenticate", b'Bearer realm="noisewise"')]})
        await send({"type": "http.response.body", "body": UNAUTHORIZED_BODY})


def main(argv: list[str] | None = None) -> int:
    """``python -m noisewise.services.auth new`` | ``python -m noisewise.services.auth hash < keys``."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["new"]:
        key = new_api_key()
        print(key)
        print(hash_api_key(key))
        return 0
    if args == ["hash"]:
        keys = [line.strip() for line in sys.stdin if line.strip()]
        if not keys:
            print("noisewise: error: no keys on stdin", file=sys.stderr)
            return 2
        for key in keys:
            print(hash_api_key(key))
        return 0
    print("usage: python -m noisewise.services.auth new | python -m noisewise.services.auth hash < keys.txt\n"
          "  new: print a fresh key and its keys-file line; hash: a keys-file line per key read from stdin",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
