"""ASGI middleware: request bodies over ``NOISEWISE_MAX_BODY_BYTES`` get 413 before anything reads them."""

from __future__ import annotations

from starlette.responses import JSONResponse

from noisewise.services.settings import Settings, SettingsError


class BodyLimit:
    """ASGI middleware: a request body over ``NOISEWISE_MAX_BODY_BYTES`` gets 413: at once from its
    Content-Length, or, for a chunked body (no Content-Length), as soon as the bytes received pass the limit."""

    def __init__(self, app):
        self.app = app
        self.limit = self._read_limit()

    @staticmethod
    def _read_limit() -> int:
        try:
            return Settings.from_env().max_body_bytes
        except SettingsError:  # reported by the service itself, in one line
            return Settings().max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":  # the app can be started again (tests): follow the environment
            self.limit = self._read_limit()
        elif scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is None:  # chunked: nothing bounds it but us (uvicorn checks a Content-Length is honest)
                receive = await self._read_bounded(receive)
                if receive is None:
                    return await self._too_large("request body is", scope, send)
            elif length.isdigit() and int(length) > self.limit:
                return await self._too_large(f"request body of {int(length)} bytes is", scope, send)
        return await self.app(scope, receive, send)

    async def _read_bounded(self, receive):
        """Read the whole body, up to the limit: a ``receive`` that replays it, or None past the limit."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                return _replay([message], receive)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return None
            more = message.get("more_body", False)
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive)

    async def _too_large(self, what: str, scope, send) -> None:
        body = {"error": f"{what} over the limit of {self.limit} bytes (NOISEWISE_MAX_BODY_BYTES)", "detail": []}
        await JSONResponse(body, status_code=413)(scope, _no_body, send)


def _replay(messages: list[dict], receive):
    async def replay():
        return messages.pop(0) if messages else await receive()

    return replay


async def _no_body():
    return {"type": "http.disconnect"}
