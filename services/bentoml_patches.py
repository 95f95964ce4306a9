"""Fixes to BentoML 1.4 internals that the service needs (bentoml is pinned below 1.5; revisit on upgrade).

Each is tested: ``tests/e2e/test_fuzz.py`` (multipart) and ``tests/integration/test_request_memory.py``
(request timers).
"""

from __future__ import annotations

import asyncio

from pydantic import ValidationError
from starlette.responses import JSONResponse


_applied = False


def apply() -> None:
    """Apply every fix, once per process."""
    global _applied
    if not _applied:
        _uploads_only()
        _cancel_request_timers()
        _applied = True


def _uploads_only() -> None:
    """BentoML's multipart parser downloads a text part as a URL (server-side request forgery; a non-URL is a
    500), and answers a body that is not valid multipart with a 500: only uploaded files are images, and bad
    multipart is a 400 like any bad input."""
    from _bentoml_impl.serde import MultipartSerde
    from pydantic_core import PydanticCustomError
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    parse_request = MultipartSerde.parse_request

    async def parse_multipart(self, request, cls):
        try:
            return await parse_request(self, request, cls)
        except HTTPException as err:
            raise ValidationError.from_exception_data("ImageUpload", [{
                "type": PydanticCustomError("multipart", "expected multipart/form-data with PNG/JPEG files in the "
                                            "field 'images': {problem}", {"problem": str(err.detail)}),
                "loc": ("body",), "input": "<body>"}]) from None

    async def ensure_file(obj):
        if isinstance(obj, UploadFile):
            return obj
        raise ValidationError.from_exception_data("ImageUpload", [{
            "type": PydanticCustomError("not_a_file", "expected an uploaded PNG/JPEG file, got a text field "
                                        "(URLs are not fetched)"), "loc": ("images",), "input": "<text>"}])

    MultipartSerde.ensure_file = staticmethod(ensure_file)
    MultipartSerde.parse_request = parse_multipart


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
