"""API-key authentication (services/auth.py): the middleware on a small Starlette app with every route of the
service (fast), then the real service in-process with a registered model: every protected endpoint without a
key, with a wrong key and with a good key; open endpoints stay open; the 401 reveals nothing."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from noisewise.services import auth
from noisewise.services.auth import (
    ADMIN_ROUTES,
    METRICS_ROUTE,
    OPEN_ROUTES,
    PREDICT_ROUTES,
    ApiKeyAuth,
    AuthConfig,
    auth_from_env,
    hash_api_key,
)
from noisewise.services.settings import Settings, SettingsError

KEY, OTHER_KEY = "k" * 20 + "-first-key", "second-key-0123456789"
WRONG = "w" * 30
UNAUTHORIZED = {"error": "authentication required", "detail": []}
FUTURE_ROUTE = "/retrain"  # a route nobody listed anywhere: protected by default
ALL_ROUTES = sorted(ADMIN_ROUTES | PREDICT_ROUTES | OPEN_ROUTES | {METRICS_ROUTE, FUTURE_ROUTE})


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


# --- the middleware on a small app ----------------------------------------------------------------
def small_app() -> Starlette:
    async def endpoint(request):
        return PlainTextResponse(f"reached {request.url.path}")

    return Starlette(routes=[Route(path, endpoint, methods=["GET", "POST"]) for path in ALL_ROUTES])


@contextlib.contextmanager
def small_client(env: dict):
    """The middleware reading ``env`` as the service would (at lifespan start-up)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in (auth.KEYS_ENV, auth.KEYS_FILE_ENV, auth.PREDICT_ENV, auth.METRICS_ENV):
            mp.delenv(name, raising=False)
        for name, value in env.items():
            mp.setenv(name, value)
        with TestClient(ApiKeyAuth(small_app())) as client:
            yield client


@pytest.fixture(scope="module")
def keyed():
    with small_client({auth.KEYS_ENV: f"{KEY},{OTHER_KEY}"}) as client:
        yield client


ALWAYS_PROTECTED = sorted(ADMIN_ROUTES | {FUTURE_ROUTE, "/feedback/", "/no/such/path"})
BAD_HEADERS = {
    "missing": {},
    "wrong key": bearer(WRONG),
    "prefix of a key": bearer(KEY[:-1]),
    "key with a suffix": bearer(KEY + "x"),
    "empty bearer": {"Authorization": "Bearer "},
    "basic scheme": {"Authorization": f"Basic {KEY}"},
    "key without scheme": {"Authorization": KEY},
    "hash instead of key": bearer(hash_api_key(KEY)),
}


@pytest.mark.parametrize("path", ALWAYS_PROTECTED)
@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_protected_route_without_a_good_key_is_a_401_that_reveals_nothing(keyed, path, case):
    response = keyed.post(path, headers=BAD_HEADERS[case], json={"items": []})
    assert response.status_code == 401
    assert response.json() == UNAUTHORIZED
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "reached" not in response.text


def test_the_401_is_byte_identical_for_every_failure_and_every_path(keyed):
    answers = {(path, case): keyed.post(path, headers=headers)
               for path in ALWAYS_PROTECTED for case, headers in BAD_HEADERS.items()}
    bodies = {r.content for r in answers.values()}
    headers = {tuple(sorted((k, v) for k, v in r.headers.items())) for r in answers.values()}
    assert len(answers) == len(ALWAYS_PROTECTED) * len(BAD_HEADERS) and len(bodies) == 1 and len(headers) == 1


@pytest.mark.parametrize("path", sorted(ADMIN_ROUTES | {FUTURE_ROUTE}))
@pytest.mark.parametrize("key", [KEY, OTHER_KEY])
def test_protected_route_with_a_good_key_reaches_the_app(keyed, path, key):
    response = keyed.post(path, headers=bearer(key))
    assert response.status_code == 200 and response.text == f"reached {path}"


def test_scheme_is_case_insensitive_and_two_authorization_headers_are_refused(keyed):
    assert keyed.post("/feedback", headers={"Authorization": f"bEaReR {KEY}"}).status_code == 200
    twice = keyed.post("/feedback", headers=[("Authorization", f"Bearer {KEY}"), ("Authorization", f"Bearer {KEY}")])
    assert twice.status_code == 401


@pytest.mark.parametrize("path", sorted(OPEN_ROUTES | PREDICT_ROUTES | {METRICS_ROUTE}))
def test_health_docs_metrics_and_predict_stay_open_by_default(keyed, path):
    for headers in ({}, bearer(WRONG)):  # a wrong key on an open route is not refused either
        response = keyed.get(path, headers=headers)
        assert response.status_code == 200 and response.text == f"reached {path}"


@pytest.mark.parametrize("flag, paths", [(auth.PREDICT_ENV, sorted(PREDICT_ROUTES)), (auth.METRICS_ENV, [METRICS_ROUTE])])
def test_predict_and_metrics_need_a_key_when_configured_to(flag, paths):
    other = sorted((PREDICT_ROUTES | {METRICS_ROUTE}) - set(paths))
    with small_client({auth.KEYS_ENV: KEY, flag: "1"}) as client:
        for path in paths:
            assert client.post(path).status_code == 401
            assert client.post(path, headers=bearer(WRONG)).json() == UNAUTHORIZED
            assert client.post(path, headers=bearer(KEY)).text == f"reached {path}"
        for path in other:  # the other flag is still off
            assert client.post(path).status_code == 200
        for path in sorted(OPEN_ROUTES):  # health and docs never need a key
            assert client.get(path).status_code == 200
    with small_client({auth.KEYS_ENV: KEY, flag: "0"}) as client:
        assert [client.post(path).status_code for path in paths] == [200] * len(paths)


def test_without_keys_nothing_is_protected_and_a_warning_is_logged_once_per_start():
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("bentoml.noisewise")
    logger.addHandler(handler)
    try:
        with small_client({}) as client:
            statuses = {path: client.post(path).status_code for path in ALL_ROUTES}
            client.post("/feedback")
    finally:
        logger.removeHandler(handler)
    assert statuses == dict.fromkeys(ALL_ROUTES, 200)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "/feedback" in warnings[0] and "/reload" in warnings[0]
    assert auth.KEYS_ENV in warnings[0]


def test_hashed_keys_file_with_comments(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text(f"# operators\n\n{hash_api_key(KEY)}  # alice\n   {hash_api_key(OTHER_KEY).upper().replace('SHA256', 'sha256')}\n")
    with small_client({auth.KEYS_FILE_ENV: str(path)}) as client:
        assert client.post("/feedback", headers=bearer(KEY)).status_code == 200
        assert client.post("/feedback", headers=bearer(OTHER_KEY)).status_code == 200
        assert client.post("/feedback", headers=bearer(WRONG)).status_code == 401
        assert client.post("/feedback").json() == UNAUTHORIZED
    # both sources pooled (rotation: the old key in the environment, the new one in the file)
    config = auth_from_env({auth.KEYS_ENV: WRONG, auth.KEYS_FILE_ENV: str(path)})
    assert len(config.digests) == 3 and all(config.accepts(k) for k in (KEY, OTHER_KEY, WRONG))


def test_hash_api_key_is_the_sha256_line_and_the_helper_makes_working_keys(capsys):
    assert hash_api_key(KEY) == "sha256:" + hashlib.sha256(KEY.encode()).hexdigest()
    assert auth.main(["new"]) == 0
    key, line = capsys.readouterr().out.split()
    assert len(key) >= auth.MIN_KEY_CHARS and line == hash_api_key(key)
    assert AuthConfig(digests=(bytes.fromhex(line.removeprefix("sha256:")),)).accepts(key)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdin", io.StringIO(f"{KEY}\n\n{OTHER_KEY}\n"))
        assert auth.main(["hash"]) == 0
    assert capsys.readouterr().out.split() == [hash_api_key(KEY), hash_api_key(OTHER_KEY)]
    assert auth.main([]) == 2


@pytest.mark.parametrize("presented", [KEY, OTHER_KEY, "third-key-abcdefghijkl", WRONG, "x"])
def test_every_configured_key_is_compared_in_constant_time_whatever_is_presented(monkeypatch, presented):
    config = auth_from_env({auth.KEYS_ENV: f"{KEY},{OTHER_KEY},third-key-abcdefghijkl"})
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    assert config.accepts(presented) == (presented != WRONG and presented != "x")
    # one comparison per configured key, even when the first one matched, and always of two 32-byte digests
    # (the presented key is hashed first, so its length cannot show either)
    assert len(calls) == 3
    assert [b for _, b in calls] == list(config.digests)
    assert {len(a) for a, _ in calls} == {32} and {a for a, _ in calls} == {hashlib.sha256(presented.encode()).digest()}


def test_keys_are_held_as_digests_only():
    settings = Settings.from_env({auth.KEYS_ENV: KEY})
    assert settings.auth.digests == (hashlib.sha256(KEY.encode()).digest(),)
    assert KEY not in repr(settings) and KEY not in repr(settings.auth)


BAD_CONFIG = [
    ({auth.KEYS_ENV: f"{KEY},,{OTHER_KEY}"}, auth.KEYS_ENV, "key 2 of 3 is empty"),
    ({auth.KEYS_ENV: f"{KEY},"}, auth.KEYS_ENV, "key 2 of 2 is empty"),
    ({auth.KEYS_ENV: "short"}, auth.KEYS_ENV, "at least 16"),
    ({auth.KEYS_ENV: "a key with spaces in it"}, auth.KEYS_ENV, "visible ASCII"),
    ({auth.KEYS_FILE_ENV: "/no/such/keys.txt"}, auth.KEYS_FILE_ENV, "cannot read '/no/such/keys.txt'"),
    ({auth.PREDICT_ENV: "1"}, auth.PREDICT_ENV, "needs keys"),
    ({auth.METRICS_ENV: "1"}, auth.METRICS_ENV, "needs keys"),
    ({auth.KEYS_ENV: KEY, auth.PREDICT_ENV: "maybe"}, auth.PREDICT_ENV, "expected 1/0"),
    ({"NOISEWISE_REQUEST_TIMEOUT_S": "soon"}, "NOISEWISE_REQUEST_TIMEOUT_S", "expected a number of seconds"),
    ({"NOISEWISE_REQUEST_TIMEOUT_S": "90"}, "NOISEWISE_REQUEST_TIMEOUT_S", "less than the server's timeout of 60"),
]


@pytest.mark.parametrize("env, name, message", BAD_CONFIG, ids=[f"{c[1]}: {c[2]}" for c in BAD_CONFIG])
def test_bad_configuration_is_one_line_naming_the_variable(env, name, message):
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    text = str(err.value)
    assert text.startswith(f"{name}") and message in text and "\n" not in text
    for key in (KEY, OTHER_KEY, "short", "a key with spaces in it"):  # keys never end up in logs
        assert key not in text


@pytest.mark.parametrize("content, line, needle", [
    ("# only a comment\n\n", None, "has no keys"),
    (f"{hash_api_key(KEY)}\nsha256:abc\n", 2, "expected sha256:<64 hex digits>"),
    (f"{KEY}\n", 1, "expected sha256:<64 hex digits>"),  # a plaintext key pasted by mistake: not echoed
    ("md5:" + "0" * 32 + "\n", 1, "expected sha256"),
    (hash_api_key(KEY)[:-1] + "g\n", 1, "expected sha256"),
])
def test_malformed_keys_file_names_the_line_without_showing_it(tmp_path, content, line, needle):
    path = tmp_path / "keys.txt"
    path.write_text(content)
    with pytest.raises(SettingsError) as err:
        Settings.from_env({auth.KEYS_FILE_ENV: str(path)})
    text = str(err.value)
    assert text.startswith(auth.KEYS_FILE_ENV) and needle in text and "\n" not in text
    if line is not None:
        assert f"line {line} of" in text
    assert KEY not in text and "md5" not in text


def test_broken_configuration_fails_closed_until_the_service_stops():
    with small_client({auth.KEYS_ENV: f"{KEY},", auth.PREDICT_ENV: "0"}) as client:
        assert client.post("/feedback", headers=bearer(KEY)).status_code == 401
        assert client.post("/predict", headers=bearer(KEY)).status_code == 401
        assert client.get("/metrics").status_code == 401
        assert client.get("/healthz").status_code == 200 and client.get("/docs.json").status_code == 200


# --- the real service -----------------------------------------------------------------------------
@contextlib.contextmanager
def serve(env: dict):
    from tests.integration.serving_model import asgi_app, ensure_model

    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"NOISEWISE_MODEL": ensure_model(), "NOISEWISE_RELOAD_INTERVAL_S": "0",
                            "NOISEWISE_MONITOR_INTERVAL_S": "0", **env}.items():
            mp.setenv(name, value)
        with TestClient(asgi_app()) as client:
            yield client


@pytest.fixture(scope="module")
def service_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("auth-service")
    keys = home / "keys.txt"
    keys.write_text(f"# test keys\n{hash_api_key(OTHER_KEY)}\n")
    return {"NOISEWISE_STORE_URL": f"sqlite:///{home / 'store.db'}", auth.KEYS_ENV: KEY,
            auth.KEYS_FILE_ENV: str(keys)}


def row():
    from tests.integration.serving_model import digits

    x, _ = digits(1, start=7)
    return x.reshape(1, -1).tolist()


def call(client, path: str, headers: dict, body=None):
    if path == "/metrics":
        return client.get(path, headers=headers)
    return client.post(path, headers=headers, json=body) if body is not None else client.post(path, headers=headers)


@pytest.mark.slow
def test_service_admin_routes_need_a_key_and_predict_stays_open(service_env):
    with serve(service_env) as client:
        prediction = client.post("/predict", json={"inputs": row()})
        assert prediction.status_code == 200, prediction.text  # open by default
        assert client.post("/model").status_code == 200 and client.get("/model").status_code == 200
        feedback = {"items": [{"prediction_id": prediction.json()["predictions"][0]["id"], "label": 1}]}
        calls = {"/feedback": feedback, "/suspects": {}, "/reload": None}  # path -> a well-formed body
        assert set(calls) == ADMIN_ROUTES
        for path, body in calls.items():
            refused = [call(client, path, headers, body) for headers in ({}, bearer(WRONG), {"Authorization": KEY})]
            assert [r.status_code for r in refused] == [401, 401, 401], path
            assert all(r.json() == UNAUTHORIZED and r.headers["www-authenticate"].startswith("Bearer")
                       for r in refused)
            assert len({r.content for r in refused}) == 1
            for key in (KEY, OTHER_KEY):  # from the environment and from the hashed-keys file
                accepted = call(client, path, bearer(key), body)
                assert accepted.status_code == 200, (path, accepted.text)
        # the feedback went in once (the second good call was a duplicate), under a key
        again = client.post("/feedback", headers=bearer(KEY), json=feedback)
        assert again.json()["duplicates"] == 1
        for path in ("/healthz", "/livez", "/readyz", "/docs.json", "/metrics"):
            assert client.get(path).status_code == 200, path
        assert client.post("/feedback/", headers=bearer(WRONG)).status_code == 401  # no path probing
        spec = client.get("/docs.json").json()
        assert set(spec["components"]["securitySchemes"]) == {"bearerAuth"}
        for path in ADMIN_ROUTES:  # the document says which routes need a key under this configuration
            operation = spec["paths"][path]["post"]
            assert operation["security"] == [{"bearerAuth": []}] and "401" in operation["responses"], path
        for path, method in (("/predict", "post"), ("/predict_image", "post"), ("/model", "get"), ("/model", "post"),
                             ("/metrics", "get"), ("/healthz", "get")):
            operation = spec["paths"][path][method]
            assert "security" not in operation and "401" not in operation["responses"], (path, method)


@pytest.mark.slow
def test_service_predict_and_metrics_need_a_key_when_configured(service_env):
    env = {**service_env, auth.PREDICT_ENV: "1", auth.METRICS_ENV: "1"}
    with serve(env) as client:
        calls = {"/predict": {"inputs": row()}, "/model": None, "/metrics": None}
        for path, body in calls.items():
            for headers in ({}, bearer(WRONG)):
                response = call(client, path, headers, body)
                assert response.status_code == 401 and response.json() == UNAUTHORIZED, path
            assert call(client, path, bearer(OTHER_KEY), body).status_code == 200, path
        for headers in ({}, bearer(WRONG)):
            assert client.get("/model", headers=headers).status_code == 401
        assert client.get("/model", headers=bearer(KEY)).json() == client.post("/model", headers=bearer(KEY)).json()
        spec = client.get("/docs.json").json()
        for path, method in (("/predict", "post"), ("/predict_image", "post"), ("/model", "get"), ("/model", "post"),
                             ("/metrics", "get"), ("/feedback", "post")):
            operation = spec["paths"][path][method]
            assert operation["security"] == [{"bearerAuth": []}] and "401" in operation["responses"], (path, method)
        assert "security" not in spec["paths"]["/healthz"]["get"]
        upload = [("images", ("a.png", b"\x89PNG not checked before the key", "image/png"))]
        assert client.post("/predict_image", files=upload).status_code == 401
        assert client.post("/predict_image", files=upload, headers=bearer(KEY)).status_code == 400
        for path in ("/healthz", "/livez", "/readyz", "/docs.json"):
            assert client.get(path).status_code == 200, path


@pytest.mark.slow
def test_bad_auth_configuration_stops_the_service_with_one_line(service_env, capsys):
    from noisewise.services.service import EXIT_MODEL, StartupError, check_model_here
    from tests.integration.serving_model import asgi_app

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(auth.KEYS_FILE_ENV, "/no/such/keys.txt")
        assert check_model_here() == EXIT_MODEL  # the check `bentoml serve` runs before starting workers
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"noisewise: error: {auth.KEYS_FILE_ENV}: cannot read") and "\n" not in err
        with pytest.raises(StartupError, match=auth.KEYS_FILE_ENV), TestClient(asgi_app()):
            pass
