"""The feedback lane: ``POST /feedback`` served in front of BentoML's middleware stack.

A one-item feedback request is cheap for noisewise (a validation, a share of a group commit) but BentoML's
ASGI stack around every route (request metrics, OpenTelemetry, access log, timeout, routing, its endpoint
wrapper) costs several times that on the event loop, which caps annotation tools that send labels one at a
time. The lane answers ``POST /feedback`` itself, with the same contract as the BentoML route:

- the same answer: the body is parsed by the route's own input model and answered by the function the route
  calls (:func:`noisewise.services.feedback_api.answer_feedback`), so statuses and bodies are the route's;
- the same key check and body limit: :class:`~noisewise.services.auth.ApiKeyAuth` and
  :class:`~noisewise.services.body_limit.BodyLimit` themselves wrap the lane's handler;
- BentoML's request metrics for endpoint ``/feedback`` (requests by status, duration, in progress, last
  request time), on the very metric objects BentoML's metrics middleware created, so dashboards count it;
- BentoML's traffic timeout (504 with BentoML's body) and its ``Server`` header.

It skips BentoML's access-log line and trace span for ``/feedback``. Everything else (other routes and methods,
lifespan, a body that is not JSON, attribute access on the app) goes to BentoML's app unchanged. With
``NOISEWISE_FEEDBACK_LANE=0``, or when BentoML's CORS handling is on, ``/feedback`` goes through BentoML's stack.

It is installed by :mod:`noisewise.services.bentoml_patches` around the app BentoML builds.
"""

from __future__ import annotations

import asyncio
import logging
from timeit import default_timer
from typing import Any

from _bentoml_impl.serde import ALL_SERDE, JSONSerde
from _bentoml_sdk.service import get_current_service

from noisewise.services.auth import ApiKeyAuth
from noisewise.services.body_limit import BodyLimit
from noisewise.services.feedback_api import JSON, answer_feedback
from noisewise.services.settings import Settings, SettingsError

log = logging.getLogger("bentoml.noisewise")

ROUTE = "/feedback"
#: The API (method name) of the route the lane serves.
API_NAME = "feedback"
#: BentoML's answer when a request outlasts its traffic timeout (``TimeoutMiddleware``).
TIMEOUT_MESSAGE = "Not able to process the request in {timeout} seconds"
#: BentoML's answer to an error it did not expect (``api_endpoint_wrapper``): never a traceback to the client.
_JSON_TYPE = JSON.encode()
UNEXPECTED = b'{"error":"An unexpected error has occurred, please check the server log."}'


def _json_request(scope) -> bool:
    """Whether BentoML would parse this request's body as JSON (its default for a missing or unknown type)."""
    for name, value in scope.get("headers") or ():
        if name == b"content-type":  # ASGI header names are lower-case
            media = value.decode("latin-1").split(";")[0].strip()
            return ALL_SERDE.get(media, JSONSerde) is JSONSerde
    return True


class FeedbackLane:
    """ASGI app that serves ``POST /feedback`` and hands everything else to ``app`` (BentoML's app).

    Parameters
    ----------
    app : ASGI app
        The Starlette app BentoML built for the service.
    factory : _bentoml_impl.server.app.ServiceAppFactory
        Its factory: the service's APIs, traffic timeout, CORS setting and name.
    traffic_metrics : callable
        Returns BentoML's metrics middleware once it set its metrics up (None before, or with metrics off).
    """

    def __init__(self, app, factory, traffic_metrics):
        self.app = app
        self._factory = factory
        self._traffic_metrics = traffic_metrics
        self._children: dict[int, tuple[Any, Any]] = {}
        self._in_progress = self._last_request = None
        self._server = f"BentoML Service/{factory.service.name}".encode("latin-1")
        self._configure()

    def __getattr__(self, name: str) -> Any:  # the app BentoML built, for whoever inspects it
        return getattr(self.app, name)

    def _configure(self) -> None:
        """Read the settings (at every lifespan start-up, as the middleware it reuses does)."""
        try:
            enabled = Settings.from_env().feedback_lane
        except SettingsError:  # reported by the service itself, in one line
            enabled = Settings().feedback_lane
        api = self._factory.service.apis.get(API_NAME)
        self.enabled = (enabled and api is not None and api.route == ROUTE
                        and not self._factory.enable_access_control)  # CORS headers: BentoML's stack adds them
        self._input = api.input_spec if api is not None else None
        self._timeout = self._factory.timeout
        # the service's own key check and body limit, in the same order as in BentoML's stack
        self._guarded = ApiKeyAuth(BodyLimit(self._serve))
        self._children.clear()
        self._in_progress = self._last_request = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            self._configure()
        elif (self.enabled and scope["type"] == "http" and scope["path"] == ROUTE and scope["method"] == "POST"
              and _json_request(scope)):
            return await self._metered(scope, receive, send)
        return await self.app(scope, receive, send)

    # --- BentoML's request metrics (RunnerTrafficMetricsMiddleware), on its own metric objects -------------
    def _metric_children(self, status: int):
        """(request total, duration) children for ``status``; labels are looked up once per status."""
        children = self._children.get(status)
        if children is None:
            middleware = self._traffic_metrics()
            if middleware is None:
                return None
            labels = self._labels(status=status)
            children = (middleware.metrics_request_total.labels(**labels),
                        middleware.metrics_request_duration.labels(**labels))
            self._children[status] = children
        return children

    @staticmethod
    def _labels(status: int | None = None) -> dict[str, Any]:
        from bentoml._internal.context import server_context

        labels = {"endpoint": ROUTE, "service_name": server_context.bento_name,
                  "service_version": server_context.bento_version, "runner_name": server_context.service_name}
        if status is not None:
            labels["http_response_code"] = status
        return labels

    def _gauges(self):
        if self._in_progress is None:
            middleware = self._traffic_metrics()
            if middleware is None:
                return None
            labels = self._labels()
            self._in_progress = middleware.metrics_request_in_progress.labels(**labels)
            del labels["endpoint"]
            self._last_request = middleware.metrics_last_request_timestamp.labels(**labels)
        return self._in_progress, self._last_request

    async def _metered(self, scope, receive, send) -> None:
        start = default_timer()
        gauges = self._gauges()
        status = 0

        async def metered_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif not message.get("more_body", False):
                children = self._metric_children(status)
                if children is not None:
                    children[0].inc()
                    children[1].observe(max(default_timer() - start, 0))
            await send(message)

        if gauges is None:
            return await self._timed(scope, receive, metered_send)
        gauges[1].set_to_current_time()
        gauges[0].inc()
        try:
            await self._timed(scope, receive, metered_send)
        finally:
            gauges[0].dec()

    # --- BentoML's traffic timeout: 504 unless the answer started in time --------------------------------
    async def _timed(self, scope, receive, send) -> None:
        if not self._timeout:
            return await self._guarded(scope, receive, send)
        started = False

        async def timed_send(message) -> None:
            nonlocal started
            if not started:
                started = True
                deadline.reschedule(None)  # like BentoML's: only the wait for the answer is bounded
            await send(message)

        try:
            async with asyncio.timeout(self._timeout) as deadline:
                await self._guarded(scope, receive, timed_send)
        except TimeoutError:
            if started:
                raise
            body = f'{{"error":"{TIMEOUT_MESSAGE.format(timeout=self._timeout)}"}}'.encode()
            await self._respond(send, 504, body)

    # --- the route ---------------------------------------------------------------------------------------
    async def _serve(self, scope, receive, send) -> None:
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nobody to answer
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        try:
            # parsed as BentoML's JSON serde parses the route's body (an empty body is an empty object)
            body = self._input.model_validate_json(b"".join(chunks) or b"{}")
            service = _service()
            if service is None:
                status, content = 503, b'{"error":"the service is starting","detail":[]}'
            else:
                parsed = body.fields() if body._parse_error is None else body._parse_error
                status, content = await answer_feedback(parsed, service.store,
                                                        service.served.calibration,
                                                        service.settings.max_feedback_items)
        except Exception:  # a bug, not bad input: BentoML's answer, and the traceback in the log only
            log.exception("noisewise: the feedback lane failed on a request")
            status, content = 500, UNEXPECTED
        await self._respond(send, status, content)

    async def _respond(self, send, status: int, content: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-length", str(len(content)).encode()), (b"content-type", _JSON_TYPE),
            (b"server", self._server)]})
        await send({"type": "http.response.body", "body": content})


def _service():
    """The service instance, or None before BentoML created it."""
    try:
        return get_current_service()
    except Exception:
        return None
