"""HTTP plumbing shared by the gateway's routes: JSON errors, bounded body reading, multipart."""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect


class RequestError(Exception):
    """A request the client must fix (or retry): becomes a JSON error with this status."""

    def __init__(self, status_code: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code, self.message, self.headers = status_code, message, headers


def error_response(status_code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status_code, content={"error": {"status": status_code, "message": message}}, headers=headers)


async def read_body(request: Request, max_bytes: int, timeout_s: float | None = None) -> bytes:
    """The request payload — raw body or the ``file`` field of a multipart form — within a size
    limit enforced while streaming (so an oversized or chunked upload is refused without buffering
    it all) and a deadline for the whole body (so a slow upload cannot hold a gateway slot)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(413, f"body of {declared} bytes exceeds the limit of {max_bytes} bytes")
    chunks, size = [], 0
    try:
        # One deadline for the whole body, not per chunk: a client trickling a byte a second
        # would otherwise keep a per-chunk timer alive forever.
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise RequestError(413, f"body exceeds the limit of {max_bytes} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(408, f"request body not received within {timeout_s:g} s", {"Connection": "close"}) from None
    except ClientDisconnect:
        raise RequestError(400, "client disconnected before sending the whole body") from None
    body = b"".join(chunks)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        body = await _multipart_file(request, body)
    if not body:
        raise RequestError(400, "empty body: send the input as the request body or a multipart 'file' field")
    return body


async def _multipart_file(request: Request, body: bytes) -> bytes:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartParser

    async def replay():
        yield body
        yield b""

    try:
        form = await MultiPartParser(request.headers, replay()).parse()
    except Exception as exc:  # noqa: BLE001 - any parse failure is the client's malformed form
        raise RequestError(400, f"malformed multipart body: {exc}") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise RequestError(400, "multipart body needs a 'file' field")
    return await upload.read()
