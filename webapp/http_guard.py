"""The web server's own checks, in front of every Gradio route (an ASGI middleware).

Gradio checks the login cookie on most of its routes, but not all (``/gradio_api/cancel``,
``/reset``, ``/heartbeat``, ``/stream/...`` answered anyone), and it keeps a login valid
until restart even after the account is removed. So, for every request:

* **Who is calling**: the login cookie's user is looked up in the database on every
  request. A removed or disabled user's login is dropped from Gradio's table at once
  (that browser is logged out) and the request goes on as anonymous.
* **Anonymous callers** (when the app has users) reach only what the login page needs
  (``PUBLIC_PATHS`` / ``PUBLIC_PREFIXES``); everything else answers 401.
* **Login throttling**: the source address of each request is handed to
  ``pipeline.auth.gradio_auth`` (``auth.login_address``), which throttles per address
  and per name (``auth.LoginThrottle``).
* **Downloads**: ``/facelab/download/<token>`` serves a dataset export once, to the user
  who made it (``pipeline.datasets.downloads``); the file is unlinked as the sending starts.
* **Security headers** on every response that passes here (``SECURITY_HEADERS``), error
  pages included: no framing by other sites (clickjacking), no MIME sniffing, no
  referrer, and a Content-Security-Policy that allows only this origin (Gradio's page
  needs inline scripts and styles and ``eval`` for its event JavaScript).

Addresses: uvicorn (under Gradio) takes the client address from ``X-Forwarded-For`` when
the connection comes from 127.0.0.1 (a reverse proxy on this machine), else from the
socket. A caller on this machine could therefore claim other addresses; the per-name
limit (with its exemption for addresses the user logged in from before) still bounds
guessing then.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import anyio.to_thread
from starlette.requests import HTTPConnection
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)

from pipeline import auth
from pipeline.context import Lab
from pipeline.datasets import downloads
from pipeline.errors import FaceLabError

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DOWNLOAD_PREFIX = "/facelab/download/"

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    # Gradio's page boots from an inline script and runs event JavaScript with eval
    "script-src 'self' 'unsafe-inline' 'unsafe-eval'",
    "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data: blob:",
    "media-src 'self' data: blob:",
    "font-src 'self' data:",
    "connect-src 'self'",
    "worker-src 'self' blob:",
    "object-src 'none'",
    "base-uri 'self'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])

SECURITY_HEADERS: dict[str, str] = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}

#: what an anonymous browser needs to show the login page and log in (checked with
#: Chromium: tests/test_auth.py); everything else needs a login when the app has users
PUBLIC_PATHS = frozenset({
    "/", "/login", "/login/", "/logout", "/favicon.ico", "/robots.txt", "/manifest.json", "/theme.css",
    "/gradio_api/theme.css", "/gradio_api/startup-events", "/gradio_api/app_id", "/gradio_api/app_id/",
    "/gradio_api/login_check", "/gradio_api/login_check/", "/gradio_api/user", "/gradio_api/user/",
})
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")

#: at most this often, on any request: delete exports nobody fetched in time
PURGE_EVERY_S = 60.0


class HttpGuard:
    """The ASGI middleware; ``launch`` adds it with ``app_kwargs={"middleware": [...]}``."""

    def __init__(self, app: Callable[..., Awaitable[None]], lab: Lab, with_users: bool) -> None:
        self.app, self.lab, self.with_users = app, lab, with_users
        self._next_purge = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        auth.login_address.set(client[0] if client else None)
        path = _route(scope)
        user = await self._user(scope) if self.with_users else None
        if scope["type"] == "websocket":
            if self.with_users and user is None and not _public(path):
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return

        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in SECURITY_HEADERS.items():
                    if name.lower().encode() not in present:
                        headers.append((name.lower().encode(), value.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self._maybe_purge()
            if path.startswith(DOWNLOAD_PREFIX):
                if self.with_users and user is None:
                    response: Response = _unauthorised()
                else:
                    response = await self._download(path[len(DOWNLOAD_PREFIX):], user)
                await response(scope, receive, send_with_headers)
            elif self.with_users and user is None and not _public(path):
                await _unauthorised()(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive, send_with_headers)
        except Exception:
            if started:
                raise
            # answered here, with the headers, instead of by Starlette's bare error page
            log.exception("unhandled error on %s %s", scope.get("method"), path)
            await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send_with_headers)

    async def _user(self, scope: Scope) -> str | None:
        """The logged-in user, if their account still exists and is enabled."""
        app = scope.get("app")
        tokens = getattr(app, "tokens", None)
        cookie_id = getattr(app, "cookie_id", None)
        if tokens is None or cookie_id is None:
            return None
        cookies = HTTPConnection(scope).cookies
        token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
        name = tokens.get(token) if token else None
        if name is None:
            return None
        info = await anyio.to_thread.run_sync(auth.active_user, self.lab, name)
        if info is None:
            tokens.pop(token, None)  # that login ends now, not at the next restart
            log.info("login of %r ended: the account was removed or disabled", name)
            return None
        return info.name

    async def _download(self, token: str, user: str | None) -> Response:
        try:
            path, filename = await anyio.to_thread.run_sync(downloads.claim, self.lab, token, user)
        except auth.Forbidden as exc:
            return PlainTextResponse(str(exc), status_code=403, headers={"Cache-Control": "no-store"})
        except FaceLabError as exc:
            return PlainTextResponse(str(exc), status_code=404, headers={"Cache-Control": "no-store"})
        # opened, then unlinked before the first byte goes out: the export is gone from the
        # data folder while it is being sent (and if the sending breaks off)
        handle = open(path, "rb")  # noqa: SIM115 - closed by the generator below
        size = os.fstat(handle.fileno()).st_size
        Path(path).unlink(missing_ok=True)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while chunk := await anyio.to_thread.run_sync(handle.read, 1 << 20):
                    yield chunk
            finally:
                handle.close()

        return StreamingResponse(chunks(), media_type="application/zip", headers={
            "Content-Disposition": f'attachment; filename="{filename}"', "Content-Length": str(size),
            "Cache-Control": "no-store"})

    async def _maybe_purge(self) -> None:
        now = time.monotonic()
        if now >= self._next_purge:
            self._next_purge = now + PURGE_EVERY_S
            await anyio.to_thread.run_sync(downloads.purge, self.lab)


def _route(scope: Scope) -> str:
    """The path below the app's root path (the app may be served under a prefix)."""
    path = scope.get("path", "/") or "/"
    root = (scope.get("root_path") or "").rstrip("/")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def _public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _unauthorised() -> JSONResponse:
    return JSONResponse({"detail": {"error": "Not authenticated"}}, status_code=401,
                        headers={"Cache-Control": "no-store"})
