"""Fixes to BentoML 1.4 internals that the service needs (bentoml is pinned below 1.5; revisit on upgrade).

Each is tested: ``tests/e2e/test_fuzz.py`` (multipart), ``tests/integration/test_request_memory.py``
(request timers), ``tests/integration/test_service.py`` (index page), ``tests/integration/test_hardening_input.py``
(bad input answered without a traceback, multipart text that is not UTF-8) and
``tests/e2e/test_hardening_serving.py`` (request metrics labelled by route, never by the raw path). One is a
hook rather than a fix: the feedback lane in front of BentoML's app (``tests/e2e/test_feedback_lane.py``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable

from pydantic import ValidationError
from starlette.responses import HTMLResponse, JSONResponse


_applied = False
#: The service's own routes (besides BentoML's system routes): the only paths that label request metrics.
_routes: frozenset[str] = frozenset()


def apply(routes: Iterable[str] = ()) -> None:
    """Apply every fix, once per process; ``routes`` are the service's own routes (``/predict``, ...)."""
    global _applied, _routes
    _routes = _routes | frozenset(routes)
    if not _applied:
        _uploads_only()
        _input_errors_without_traceback()
        _cancel_request_timers()
        _index_page()
        _bounded_endpoint_labels()
        _feedback_lane()
        _applied = True


def _uploads_only() -> None:
    """BentoML's multipart parser downloads a text part as a URL (server-side request forgery; a non-URL is a
    500), answers a body that is not valid multipart with a 500, and a text part that is not UTF-8 (a binary
    file sent in a field that is not an upload, ``curl -F items=@/bin/true``) with a 500 on every route: only
    uploaded files are images, and bad multipart is a 400 naming the field, like any bad input. Same parsing
    as BentoML's ``MultipartSerde.parse_request`` otherwise."""
    from typing import get_args

    from _bentoml_impl.serde import MultipartSerde
    from _bentoml_sdk.typing_utils import is_list_type, is_union_type
    from pydantic_core import PydanticCustomError
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    def rejected(title: str, kind: str, message: str, loc: tuple, context: dict | None = None) -> ValidationError:
        return ValidationError.from_exception_data(title, [{
            "type": PydanticCustomError(kind, message, context), "loc": loc, "input": "<multipart>"}])

    async def ensure_file(obj):
        if isinstance(obj, UploadFile):
            return obj
        raise rejected("ImageUpload", "not_a_file", "expected an uploaded PNG/JPEG file, got a text field "
                       "(URLs are not fetched)", ("images",))

    async def parse_multipart(self, request, cls):
        try:
            form = await request.form()
        except HTTPException as err:
            expected = " with PNG/JPEG files in the field 'images'" if "images" in cls.multipart_fields else ""
            raise rejected(cls.__name__, "multipart", f"expected multipart/form-data{expected}: {{problem}}",
                           ("body",), {"problem": str(err.detail)}) from None
        data: dict = {}
        for key in form:
            if key in cls.multipart_fields:
                value = [await ensure_file(v) for v in form.getlist(key)]
                annotation = cls.model_fields[key].annotation
                if is_union_type(annotation):
                    annotation = get_args(annotation)[0]
                if is_list_type(annotation):
                    data[key] = value
                elif value:
                    data[key] = value[0]
                continue
            part = form[key]
            text = await part.read() if isinstance(part, UploadFile) else part
            if isinstance(text, bytes):
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError:
                    raise rejected(cls.__name__, "not_text", "expected text (UTF-8), got a binary file in this "
                                   "field", (key,)) from None
            try:
                data[key] = json.loads(text)
            except json.JSONDecodeError:
                data[key] = text
        return cls.model_validate(data)

    MultipartSerde.ensure_file = staticmethod(ensure_file)
    MultipartSerde.parse_request = parse_multipart


class _InputRejected(Exception):
    """A request body BentoML's parsing refused: carries the validation error to the endpoint wrapper."""

    def __init__(self, error: ValidationError):
        super().__init__(str(error))
        self.error = error


def _input_errors_without_traceback() -> None:
    """BentoML answers a body its parsing refuses (bad multipart, an upload form with unknown fields, a JSON
    body for a route without inputs that is not an object) with a 400 of its own format, and logs a full
    traceback for each one: anyone can fill the log. Such a body gets noisewise's error answer
    (:func:`noisewise.services.schemas.error_response`, 400 or 413 for a size limit), without a traceback.
    Validation errors raised anywhere else (a bug in the service) still reach BentoML's handler."""
    from _bentoml_impl.server.app import ServiceAppFactory
    from _bentoml_sdk.io_models import IOMixin

    from noisewise.services.schemas import error_response, error_status

    parse = IOMixin.from_http_request.__func__

    @classmethod
    async def from_http_request(cls, request, serde):
        try:
            return await parse(cls, request, serde)
        except ValidationError as err:
            raise _InputRejected(err) from None

    endpoint = ServiceAppFactory.api_endpoint

    async def api_endpoint(self, name, request):
        try:
            return await endpoint(self, name, request)
        except _InputRejected as rejected:
            return JSONResponse(error_response(rejected.error).model_dump(), status_code=error_status(rejected.error))

    IOMixin.from_http_request = from_http_request
    ServiceAppFactory.api_endpoint = api_endpoint


def _cancel_request_timers() -> None:
    """BentoML 1.4's TimeoutMiddleware (``traffic.timeout``) schedules a timer per request and never cancels
    it: each finished request's context (its tracing span, ~5 KiB) stays alive until the timer fires, 60 s
    later, so memory under load climbs for a minute before it levels off (docs/reliability.md). Same logic,
    with the timer cancelled when the request ends."""
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    async def call(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        try:
            await waiter
        except asyncio.TimeoutError:
            if fut.cancel():
                await JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                   status_code=504)(scope, receive, send)
        else:
            await fut
        finally:
            timer.cancel()

    TimeoutMiddleware.__call__ = call


INDEX_PAGE = """<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <meta name="viewport" content="width=device-width, initial-scale=1">
    <title>noisewise API</title>
    <link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css">
    <style>body { margin: 0; background: #fafafa; }</style>
  </head>
  <body>
    <noscript>
      <h1>noisewise API</h1>
      <p>This page shows the API with JavaScript. The OpenAPI document: <a href="./docs.json">docs.json</a>.</p>
    </noscript>
    <div id="swagger-ui"></div>
    <script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script>
      window.onload = function () {
        window.ui = SwaggerUIBundle({
          url: "./docs.json", dom_id: "#swagger-ui", deepLinking: true,
          validatorUrl: null,  /* no online validator badge */
          presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout",
        });
      };
    </script>
  </body>
</html>
"""


def _index_page() -> None:
    """BentoML's page at ``/`` is its own advertisement around Swagger UI: a tracking script (Google Tag
    Manager), a GitHub corner, and an online validator badge that cannot load offline. noisewise's page is
    Swagger UI alone, on the local assets, showing ``/docs.json`` (title, version and description are
    noisewise's: ``NoisewiseService.openapi_spec``). BentoML's experimental ``new_index`` UI is left alone."""
    from _bentoml_impl.server.app import ServiceAppFactory
    from bentoml._internal.configuration.containers import BentoMLContainer

    bentoml_page = ServiceAppFactory.index_page

    async def index_page(self, request):
        if BentoMLContainer.new_index:  # its own assets, without /static_content
            return await bentoml_page(self, request)
        return HTMLResponse(INDEX_PAGE)

    ServiceAppFactory.index_page = index_page


#: The request-metrics label of every path that is no route of the service: one series, whatever clients send.
UNMATCHED = "unmatched"
#: Routes of every BentoML server besides the service's own API routes.
SYSTEM_ROUTES = frozenset({"/", "/docs.json", "/schema.json", "/livez", "/healthz", "/readyz", "/metrics"})
#: Folders of static assets (of the docs page): each counts as one route.
STATIC_PREFIXES = ("/static_content/", "/assets/")


def endpoint_label(path: str, routes: Iterable[str] = ()) -> str:
    """The ``endpoint`` label of a request for ``path``: the route itself when it is one of ``routes``, of the
    routes given to :func:`apply` or of :data:`SYSTEM_ROUTES`; the folder for a static asset
    (``/static_content``); else :data:`UNMATCHED`."""
    if path in SYSTEM_ROUTES or path in _routes or path in routes:
        return path
    for prefix in STATIC_PREFIXES:
        if path.startswith(prefix):
            return prefix.rstrip("/")
    return UNMATCHED


class _EndpointLabels:
    """A Prometheus metric whose ``endpoint`` label is mapped by :func:`endpoint_label` (everything else is the
    metric's own)."""

    def __init__(self, metric):
        self._metric = metric

    def labels(self, *args, **kwargs):
        from bentoml._internal.context import server_context

        if "endpoint" in kwargs:
            kwargs["endpoint"] = endpoint_label(str(kwargs["endpoint"]), server_context.service_routes)
        return self._metric.labels(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._metric, name)


def _bounded_endpoint_labels() -> None:
    """BentoML labels its request metrics (``bentoml_service_request_*``) with the raw request path, before
    any route matched and before the API-key check: each made-up path adds about twenty series to
    ``/metrics`` for ever (5,000 requests to random paths grew it twentyfold), with keys on as well. The
    label is the route; every path that is no route shares one label, ``unmatched``. No upstream issue
    known."""
    from bentoml._internal.server.http.instruments import (
        HTTPTrafficMetricsMiddleware,
        RunnerTrafficMetricsMiddleware,
    )

    for middleware in (HTTPTrafficMetricsMiddleware, RunnerTrafficMetricsMiddleware):
        setup = middleware._setup

        def bounded_setup(self, *args, _setup=setup, **kwargs):
            global _traffic_metrics
            _setup(self, *args, **kwargs)
            for name, metric in list(vars(self).items()):
                if name.startswith("metrics_") and "endpoint" in getattr(metric, "_labelnames", ()):
                    setattr(self, name, _EndpointLabels(metric))
            if isinstance(self, RunnerTrafficMetricsMiddleware):  # the one a service's app uses
                _traffic_metrics = self

        middleware._setup = bounded_setup


#: BentoML's request-metrics middleware of this process's service app, once it set its metrics up.
_traffic_metrics = None


def traffic_metrics():
    """BentoML's request-metrics middleware (its ``metrics_request_*`` objects), or None before its set-up
    or with BentoML's metrics off: the feedback lane counts its requests on the same metrics."""
    return _traffic_metrics


def _feedback_lane() -> None:
    """Not a fix: a hook. BentoML has no public way to put an ASGI app in front of its middleware stack, and
    the feedback lane (:mod:`noisewise.services.feedback_lane`) must be there to skip it: the app BentoML
    builds for the service is wrapped in the lane, which serves ``POST /feedback`` and passes everything else
    (lifespan, other routes, attribute access) to BentoML's app unchanged."""
    from _bentoml_impl.server.app import ServiceAppFactory

    from noisewise.services.feedback_lane import FeedbackLane

    build = ServiceAppFactory.__call__

    def build_with_lane(self):
        return FeedbackLane(build(self), self, traffic_metrics)

    ServiceAppFactory.__call__ = build_with_lane
