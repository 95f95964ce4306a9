"""The commands' HTTP client (services/client.py) against a service with API keys: the key goes out as a
Bearer token (from --api-key or NOISEWISE_API_KEY), a missing or refused key is one line that says how to pass
one, refused connections and 503s are retried with a bounded backoff, and `noisewise serve` prints the
Authorization header in its curl lines exactly when the route needs a key.

The service side is the real middleware (services/auth.py) in front of a small app with the routes the
commands call, served by uvicorn on a loopback port, so the commands run end to end over real HTTP."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
import time
import uuid

import httpx
import pytest

from tests.integration.serving_model import run_in_process as run
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from noisewise.services import auth, client as client_module
from noisewise.services.auth import AuthConfig, auth_from_env
from noisewise.services.client import (
    API_KEY_ENV,
    ServiceClient,
    ServiceError,
    backoff_delays,
    curl_command,
    resolve_api_key,
)
from tests.integration.test_auth import KEY, OTHER_KEY, WRONG, small_client

CLASSES = ["cat", "dog"]


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- a keyed service on a loopback port ------------------------------------------------------------
class FakeService:
    """What the commands call: /model, /feedback (records the items), /reload; behind ApiKeyAuth."""

    def __init__(self):
        self.feedback: list[dict] = []

    def app(self) -> Starlette:
        async def model(request):
            return JSONResponse({"name": "fake", "version": "7", "classes": CLASSES})

        async def feedback(request):
            items = (await request.json())["items"]
            self.feedback += items
            return JSONResponse({"stored": len(items), "duplicates": 0, "rejected": 0,
                                 "items": [{"index": i, "outcome": "stored", "status": 200} for i in range(len(items))]})

        async def reload(request):
            return JSONResponse({"version": "8", "reloaded": True})

        async def ready(request):
            return PlainTextResponse("ok")

        return Starlette(routes=[Route("/model", model, methods=["POST"]), Route("/feedback", feedback, methods=["POST"]),
                                 Route("/reload", reload, methods=["POST"]), Route("/readyz", ready)])


@pytest.fixture(scope="module")
def keyed_service():
    """(url, FakeService): keys KEY and OTHER_KEY, /predict open, as `NOISEWISE_API_KEYS=KEY,OTHER_KEY`."""
    import uvicorn

    fake = FakeService()
    config = auth_from_env({auth.KEYS_ENV: f"{KEY},{OTHER_KEY}"})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(auth.ApiKeyAuth(fake.app(), config=config), lifespan="off",
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", fake
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def no_key_env(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)


@pytest.fixture
def quick_retries(monkeypatch):
    """The commands' retry schedule, shortened: 5 tries, 0.01 s doubling."""
    monkeypatch.setattr(client_module, "BACKOFF_S", 0.01)


def test_the_right_key_reaches_admin_routes_from_the_option_or_the_environment(keyed_service, monkeypatch):
    url, _ = keyed_service
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    for key in (KEY, OTHER_KEY):
        with ServiceClient(url, key) as client:
            assert client.post("/reload").json() == {"version": "8", "reloaded": True}
            assert client.attempts == 1
    monkeypatch.setenv(API_KEY_ENV, f"  {KEY}\n")  # the variable, as a shell or a file would give it
    with ServiceClient(url) as client:
        assert client.has_key and client.post("/reload").status_code == 200
    with ServiceClient(url, OTHER_KEY) as client:  # the option wins over the variable
        assert client.post("/reload").status_code == 200


def test_a_missing_or_wrong_key_is_one_line_that_says_how_to_pass_one(keyed_service, no_key_env):
    url, _ = keyed_service
    with ServiceClient(url) as client:
        with pytest.raises(ServiceError) as missing:
            client.post("/feedback", json={"items": []})
        assert client.attempts == 1  # a 401 is not retried
    message = one_line(str(missing.value))
    assert message.startswith(f"{url}/feedback answered 401") and "--api-key" in message and API_KEY_ENV in message
    assert not missing.value.unreachable
    with ServiceClient(url, WRONG) as client:
        with pytest.raises(ServiceError) as wrong:
            client.post("/reload")
    message = one_line(str(wrong.value))
    assert "not accepted" in message and "--api-key" in message and WRONG not in message
    with ServiceClient(url) as client:  # open routes need none
        assert client.get("/readyz").text == "ok"


def test_keys_an_http_header_cannot_carry_are_refused_without_echoing_them(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-the-environment-0123")
    assert resolve_api_key(None) == "from-the-environment-0123"
    assert resolve_api_key("given-on-the-command-line") == "given-on-the-command-line"
    assert resolve_api_key("   ") is None and resolve_api_key(None, env={}) is None
    for bad in ("with space-0123456789", "nön-ascii-0123456789", "tab\there-0123456789"):
        with pytest.raises(ServiceError) as err:
            resolve_api_key(bad)
        assert bad not in str(err.value) and "--api-key" in str(err.value)
    with pytest.raises(ServiceError, match="--url"):
        ServiceClient("127.0.0.1:3000")


def test_the_middleware_sees_the_bearer_token_through_the_in_process_app(monkeypatch):
    """The same client on the in-process ASGI app of the auth tests (its TestClient stands in for httpx.Client)."""
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with small_client({auth.KEYS_ENV: KEY}) as test_client:
        monkeypatch.setattr(httpx, "Client", lambda **_: contextlib.nullcontext(test_client))
        with ServiceClient("http://testserver", KEY) as client:
            assert client.post("/feedback").text == "reached /feedback"
        with ServiceClient("http://testserver") as client:
            with pytest.raises(ServiceError, match="needs an API key"):
                client.post("/suspects")


# --- the commands ------------------------------------------------------------------------------------
def worklist(tmp_path, n: int = 3):
    path = tmp_path / "worklist.csv"
    ids = [str(uuid.UUID(int=i + 1)) for i in range(n)]
    rows = [f"{pid},cat,a,cat,{CLASSES[i % 2]}" for i, pid in enumerate(ids)]
    path.write_text("prediction_id,observed_label,annotator,predicted_label,trusted_label\n" + "\n".join(rows) + "\n")
    return path, ids


def test_audit_submit_sends_the_key_and_without_one_stops_in_one_line(keyed_service, tmp_path, monkeypatch,
                                                                      no_key_env):
    url, fake = keyed_service
    monkeypatch.setenv("NOISEWISE_STORE_URL", f"sqlite:///{tmp_path / 'store.db'}")
    path, ids = worklist(tmp_path)
    before = len(fake.feedback)
    status, out, err = run("audit", "submit", str(path), "--url", url)
    assert status == 1 and len(fake.feedback) == before  # /model is open, /feedback refused: nothing stored
    message = one_line(err)
    assert message.startswith(f"noisewise: audit submit: {url}/feedback answered 401") and "--api-key" in message
    status, out, err = run("audit", "submit", str(path), "--url", url, "--api-key", KEY, "--json")
    assert status == 0, err
    assert json.loads(out)["stored"] == 3 and KEY not in out + err
    sent = fake.feedback[before:]
    assert [item["prediction_id"] for item in sent] == ids and all(item["audited"] for item in sent)
    monkeypatch.setenv(API_KEY_ENV, OTHER_KEY)
    status, out, err = run("audit", "submit", str(path), "--url", url, "--json")
    assert status == 0 and json.loads(out)["stored"] == 3, err


def test_audit_submit_to_a_dead_url_ends_in_one_line_after_the_retries(tmp_path, quick_retries, no_key_env):
    path, _ = worklist(tmp_path)
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    status, out, err = run("audit", "submit", str(path), "--url", url)
    assert status == 2 and out == "" and time.monotonic() - started < 5
    message = one_line(err)
    assert f"{url}/model" in message and "after 5 tries" in message and "ConnectError" in message


def test_recalibrate_tells_the_keyed_service(keyed_service, no_key_env):
    from noisewise.services.cli_feedback import _tell_service

    url, _ = keyed_service
    assert _tell_service(url, KEY) == "serving version 8 (switched now)"
    told = one_line(_tell_service(url))
    assert "401" in told and "--api-key" in told and "next alias check" in told


def test_the_commands_take_api_key_and_never_show_it_in_help(monkeypatch, capsys):
    from noisewise.services.cli import build_parser

    monkeypatch.setenv(API_KEY_ENV, KEY)
    parser = build_parser()
    for command, positional in ((["demo"], []), (["recalibrate"], []), (["audit", "submit"], ["w.csv"])):
        argv = command + positional
        assert parser.parse_args([*argv, "--api-key", OTHER_KEY]).api_key == OTHER_KEY
        assert getattr(parser.parse_args(argv), "api_key", None) is None  # the client reads the environment
        with pytest.raises(SystemExit) as done:
            parser.parse_args([*command, "--help"])
        assert done.value.code == 0
        shown = capsys.readouterr().out
        assert "--api-key" in shown and API_KEY_ENV in shown and KEY not in shown
        entry = shown.split("--api-key KEY")[-1].split("\n  -")[0]  # the option's own help paragraph
        assert API_KEY_ENV in entry and "None" not in entry


# --- retries -------------------------------------------------------------------------------------------
def flaky(failures: list, answer: int = 200):
    """A MockTransport that raises / answers ``failures`` in turn, then ``answer``; it counts the calls."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) <= len(failures):
            failure = failures[len(calls) - 1]
            if isinstance(failure, int):
                return httpx.Response(failure, text="busy")
            raise failure("boom", request=request)
        return httpx.Response(answer, json={"ok": True})

    return httpx.MockTransport(handler), calls


def test_refused_and_reset_connections_are_retried_on_the_default_schedule():
    waits: list[float] = []
    transport, calls = flaky([httpx.ConnectError, httpx.ReadError, 503])
    with ServiceClient("http://svc", "", transport=transport, sleep=waits.append) as client:
        response = client.post("/feedback", json={"items": []})
    assert response.status_code == 200 and client.attempts == 4 and len(calls) == 4
    assert waits == [0.5, 1.0, 2.0]  # 0.5 s doubling


def test_a_request_that_may_have_been_acted_on_is_not_repeated_unless_idempotent():
    for failure, tries in ((httpx.ReadError, 1), (httpx.RemoteProtocolError, 1), (httpx.ConnectError, 2)):
        transport, calls = flaky([failure])
        with ServiceClient("http://svc", "", transport=transport, sleep=lambda s: None) as client:
            if tries == 1:
                with pytest.raises(ServiceError, match=failure.__name__):
                    client.post("/predict", idempotent=False)
            else:
                assert client.post("/predict", idempotent=False).status_code == 200
        assert len(calls) == tries, failure


def test_other_answers_and_errors_are_not_retried():
    for status in (200, 207, 400, 404, 413, 500):
        transport, calls = flaky([], answer=status)
        with ServiceClient("http://svc", "", transport=transport, sleep=lambda s: None) as client:
            assert client.post("/feedback").status_code == status
        assert len(calls) == 1
    transport, calls = flaky([httpx.ReadTimeout])
    with ServiceClient("http://svc", "", transport=transport, sleep=lambda s: None) as client:
        with pytest.raises(ServiceError, match=r"^http://svc/model: ReadTimeout"):
            client.post("/model")
    assert len(calls) == 1


def test_the_backoff_is_bounded():
    assert backoff_delays() == [0.5, 1.0, 2.0, 4.0]  # 5 tries, 7.5 s of waiting at most
    assert sum(backoff_delays()) <= client_module.MAX_WAIT_S
    assert backoff_delays(10, 0.5, 10.0) == [0.5, 1.0, 2.0, 4.0, 2.5]  # the last wait is cut to the bound
    assert backoff_delays(1) == [] and backoff_delays(4, 0.0, 0.0) == [0.0, 0.0, 0.0]
    for tries, base, bound in ((30, 0.5, 10.0), (8, 3.0, 5.0), (3, 0.1, 100.0)):
        delays = backoff_delays(tries, base, bound)
        assert len(delays) <= tries - 1 and sum(delays) <= bound + 1e-12
    with pytest.raises(ValueError, match="tries"):
        backoff_delays(0)


class Busy(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first ``busy`` POSTs (class attribute), then 200."""

    busy = 0
    hits = 0

    def do_POST(self):
        type(self).hits += 1
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, body = (503, b"starting up") if type(self).hits <= type(self).busy else (200, b'{"ok": true}')
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def busy_server(busy: int):
    handler = type("Handler", (Busy,), {"busy": busy, "hits": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_a_service_answering_503_twice_is_waited_for(quick_retries):
    with busy_server(busy=2) as (url, handler):
        with ServiceClient(url, "") as client:
            response = client.post("/feedback", json={"items": []})
    assert response.status_code == 200 and response.json() == {"ok": True}
    assert handler.hits == 3 and client.attempts == 3


def test_a_service_that_stays_down_ends_in_one_line_after_the_bounded_tries(quick_retries):
    bound = sum(backoff_delays(5, 0.01)) + 3.0  # the waits plus generous time for five loopback requests
    with busy_server(busy=100) as (url, handler):
        started = time.monotonic()
        with ServiceClient(url, "") as client:
            with pytest.raises(ServiceError) as err:
                client.post("/feedback")
        assert time.monotonic() - started < bound
    assert handler.hits == 5 and client.attempts == 5
    message = one_line(str(err.value))
    assert message.startswith(f"{url}/feedback: no usable answer after 5 tries") and "answered 503: starting up" in message
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    started = time.monotonic()
    with ServiceClient(url, "") as client:
        with pytest.raises(ServiceError) as err:
            client.post("/reload")
    assert time.monotonic() - started < bound and client.attempts == 5
    message = one_line(str(err.value))
    assert message.startswith(f"{url}/reload: no usable answer after 5 tries") and "ConnectError" in message
    assert err.value.unreachable


# --- the curl lines of `noisewise serve` -------------------------------------------------------------
HEADER = '-H "Authorization: Bearer $NOISEWISE_API_KEY"'


@pytest.mark.parametrize("env, predict_needs_key", [
    ({}, False),
    ({auth.KEYS_ENV: KEY}, False),
    ({auth.KEYS_ENV: KEY, auth.PREDICT_ENV: "1"}, True),
    ({auth.KEYS_ENV: KEY, auth.METRICS_ENV: "1"}, False),
])
def test_the_curl_line_carries_the_header_exactly_when_the_route_needs_a_key(env, predict_needs_key):
    config = auth_from_env(env)
    base = "http://127.0.0.1:3000"
    for path in ("/predict", "/model"):
        line = curl_command(base, path, config, body="/tmp/x.json" if path == "/predict" else None)
        assert (HEADER in line) == predict_needs_key
        assert KEY not in line
    predict = curl_command(base, "/predict", config, body="/tmp/x.json")
    if not predict_needs_key:  # unchanged from the line printed without keys
        assert predict == f"curl -s -X POST {base}/predict -H 'Content-Type: application/json' -d @/tmp/x.json"
        assert curl_command(base, "/model", config) == f"curl -s -X POST {base}/model"
    else:
        assert predict == f"curl -s -X POST {base}/predict {HEADER} -H 'Content-Type: application/json' -d @/tmp/x.json"
    assert (HEADER in curl_command(base, "/feedback", config)) == config.enabled
    assert HEADER not in curl_command(base, "/readyz", AuthConfig(digests=config.digests, predict=True, metrics=True))
