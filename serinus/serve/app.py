"""The HTTP API (Starlette): OpenAI's audio endpoints, errors in OpenAI's shape, limits.

    POST /v1/audio/transcriptions   multipart: file, model, language, response_format, ...
    POST /v1/audio/translations     the same; target_language defaults to en
    GET  /v1/models                 the served model
    GET  /health                    queue and batch counters (answers while the model decodes)

`Guard` runs before any route: the API key (401) and the body size limit (413), the latter
from Content-Length before the body is read, else counted as it streams in. A request is
checked whole (fields, prompt slots, audio) before it takes a place in the queue, so a bad one
costs a 400 and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import re
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serinus.prompt import encode_prompt, get_format
from serinus.serve.batcher import Batcher, Job, QueueFull, decode_jobs
from serinus.serve.formats import NEEDS_SEGMENTS, RESPONSE_FORMATS, render
from serinus.serve.uploads import UploadError, decode_upload, display_name

SAMPLE_RATE = 16000
# OpenAI's fields that are read, or accepted and ignored (temperature, include, chunking_strategy:
# decoding follows the checkpoint's config; long audio is always chunked as transcribe() does).
OPENAI_FIELDS = ("file", "model", "language", "prompt", "response_format", "temperature", "stream",
                 "timestamp_granularities[]", "timestamp_granularities", "include[]", "include", "chunking_strategy")
LANGUAGE_FIELDS = {"source_lang": "language", "target_lang": "target_language"}  # Canary's names -> ours
SERVER_SLOTS = ("source_lang", "target_lang", "timestamp")  # set from language fields and response_format
GRANULARITIES = ("word", "segment")


@dataclass
class ServeConfig:
    model_id: str = "canary"
    max_batch: int = 8
    max_wait_ms: float = 50
    queue: int = 64
    max_upload_mb: float = 100
    api_key: str | None = None


class RequestError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class UploadTooLarge(RequestError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than this server's limit of {limit / 2**20:g} MB "
                              "(--max-upload-mb)", param="file", code="upload_too_large",
                         headers={"Connection": "close"})  # the rest of the body is not read


class Guard:
    """ASGI middleware: API key, then body size (declared, else counted while it streams in)."""

    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app, self.api_key, self.max_bytes = app, api_key, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.api_key is not None and not self._authorized(headers.get("authorization", "")):
            response = error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            too_large = UploadTooLarge(self.max_bytes)
            response = error_response(413, too_large.message, too_large.param, too_large.code, too_large.headers)
            return await response(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise UploadTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted_receive, send)

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


# -- reading a request -------------------------------------------------------------------------

def _single(form, name: str) -> str | None:
    values = form.getlist(name)
    if len(values) > 1:
        raise RequestError(400, f"field {name!r} was given {len(values)} times; give it once", param=name,
                           code="invalid_value")
    if values and not isinstance(values[0], str):
        raise RequestError(400, f"field {name!r} must be a text field, not a file", param=name, code="invalid_value")
    return values[0].strip() if values else None


def _either(form, ours: str, canary: str) -> str | None:
    a, b = _single(form, ours), _single(form, canary)
    if a and b and a != b:
        raise RequestError(400, f"fields {ours!r} ({a!r}) and {canary!r} ({b!r}) disagree; give one", param=ours,
                           code="invalid_value")
    return a or b or None


@dataclass
class Options:
    slots: dict
    response_format: str
    words: bool


def read_options(form, fmt, translate: bool) -> Options:
    """The request's fields -> prompt slots and response options; RequestError for anything off."""
    slot_fields = [name for name in fmt.slot_names if name not in SERVER_SLOTS]
    allowed = (*OPENAI_FIELDS, "target_language", *LANGUAGE_FIELDS, *slot_fields)
    unknown = sorted({key for key in form.keys() if key not in allowed})
    misplaced = [key for key in unknown if isinstance(form.get(key), UploadFile)]
    if misplaced and "file" not in form:
        raise RequestError(400, f"the audio goes in field 'file', not {misplaced[0]!r}", param="file",
                           code="missing_field")
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(map(repr, unknown))}; this endpoint takes: "
                                f"{', '.join(allowed)}", param=unknown[0], code="unknown_field")
    response_format = _single(form, "response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise RequestError(400, f"response_format {response_format!r} is not one of: {', '.join(RESPONSE_FORMATS)}",
                           param="response_format", code="invalid_value")
    if (_single(form, "stream") or "false").lower() not in ("false", "0", "no", ""):
        raise RequestError(400, "streaming responses are not supported: send stream=false", param="stream",
                           code="invalid_value")
    temperature = _single(form, "temperature")
    try:
        float(temperature or 0)
    except ValueError:
        raise RequestError(400, f"temperature must be a number, got {temperature!r}", param="temperature",
                           code="invalid_value") from None
    granularities = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
    for g in granularities:
        if g not in GRANULARITIES:
            raise RequestError(400, f"timestamp_granularities: {g!r} is not one of: {', '.join(GRANULARITIES)}",
                               param="timestamp_granularities[]", code="invalid_value")

    source = _either(form, "language", "source_lang") or "en"
    target = _either(form, "target_language", "target_lang") or ("en" if translate else source)
    slots = {"source_lang": source, "target_lang": target}
    for name in slot_fields:
        value = _single(form, name)
        if value is not None:
            slots[name] = value
    prompt = _single(form, "prompt")
    if prompt and "decodercontext" not in slots:
        if "decodercontext" not in fmt.slot_names:
            raise RequestError(400, f"this model's prompt format ({fmt.name}) takes no text prompt", param="prompt",
                               code="invalid_value")
        slots["decodercontext"] = prompt
    return Options(slots, response_format, "word" in granularities)


def check_slots(model, slots: dict) -> None:
    """The prompt must encode: unknown languages and slot values are refused with what is allowed."""
    try:
        encode_prompt(model.tokenizer, get_format(model.cfg.prompt_format), slots)
    except ValueError as e:
        found = re.search(r"slot '(\w+)'", str(e))
        slot = found.group(1) if found else None
        raise RequestError(400, str(e), param=LANGUAGE_FIELDS.get(slot, slot), code="invalid_value") from None


async def read_upload(form) -> tuple[bytes, str | None]:
    files = form.getlist("file")
    if not files:
        raise RequestError(400, f"missing field 'file' (the audio, as a multipart file part); fields sent: "
                                f"{', '.join(sorted(set(form.keys()))) or 'none'}", param="file", code="missing_field")
    if len(files) > 1:
        raise RequestError(400, "one 'file' per request", param="file", code="invalid_value")
    upload = files[0]
    if not isinstance(upload, UploadFile):
        raise RequestError(400, "field 'file' must be a file part (Content-Disposition with a filename) holding the "
                                "audio bytes, not a text field; the server never opens paths", param="file",
                           code="invalid_value")
    try:
        return await upload.read(), upload.filename
    finally:
        await upload.close()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- routes ------------------------------------------------------------------------------------

async def transcriptions(request: Request) -> Response:
    return await _handle(request, translate=False)


async def translations(request: Request) -> Response:
    return await _handle(request, translate=True)


async def _handle(request: Request, translate: bool) -> Response:
    batcher = request.app.state.batcher
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestError(400, "send the request as multipart/form-data with the audio in a 'file' part",
                           code="invalid_content_type")
    with batcher.arrival():
        try:
            # Before the upload is read, so a refusal costs no parsing or decoding (uvicorn drains the
            # unread body; closing the connection instead would cut the client off mid-upload).
            batcher.check_room()
            options, job = await _read_job(request, translate)
            future = asyncio.wrap_future(batcher.submit(job))
        except QueueFull as e:
            raise RequestError(503, f"{e}; retry after {e.retry_after} s", code="queue_full",
                               headers={"Retry-After": str(e.retry_after)}) from None
    disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({future, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
    if not future.done():  # the client left: drop its job (decoded only if already on the model)
        future.cancel()
        return Response(status_code=499)
    hyp = future.result()
    if hyp.error is not None:
        raise RequestError(500, f"decoding failed: {hyp.error}", code="decoding_failed")
    source, target = options.slots["source_lang"], options.slots["target_lang"]
    body, media_type = render(hyp, options.response_format, len(job.samples) / SAMPLE_RATE, source,
                              "transcribe" if source == target else "translate", options.words)
    return Response(body, media_type=media_type)


async def _read_job(request: Request, translate: bool) -> tuple[Options, Job]:
    """The request read and checked whole: its options and the job for the model."""
    state = request.app.state
    form = await request.form(max_files=4, max_fields=64)
    try:
        options = read_options(form, get_format(state.model.cfg.prompt_format), translate)
        check_slots(state.model, options.slots)
        data, filename = await read_upload(form)
    finally:
        await form.close()
    want_segments = options.response_format in NEEDS_SEGMENTS
    if want_segments and options.words and not state.can_timestamp:
        raise RequestError(400, "this model gives no word timestamps (no aligner, no frame tokens)",
                           param="timestamp_granularities[]", code="invalid_value")
    try:
        samples = await run_in_threadpool(decode_upload, data, filename)
    except UploadError as e:
        raise RequestError(400, str(e), param="file", code="invalid_audio") from None
    return options, Job(samples, options.slots, timestamps=want_segments and state.can_timestamp,
                        name=display_name(filename))


async def models(request: Request) -> Response:
    model_id = request.app.state.config.model_id
    return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                                     "owned_by": "serinus"}]})


async def health(request: Request) -> Response:
    batcher = request.app.state.batcher
    s = batcher.stats
    return JSONResponse({"status": "ok", "model": request.app.state.config.model_id, "queued": len(batcher.queue),
                         "decoding": batcher.decoding, "served": s.served, "batches": s.batches,
                         "largest_batch": s.largest_batch, "rejected": s.rejected, "cancelled": s.cancelled})


# -- errors ------------------------------------------------------------------------------------

async def _request_error(request, exc: RequestError):
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


async def _http_error(request, exc: HTTPException):
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = {404: f"no route {request.url.path!r}; routes: POST /v1/audio/transcriptions, "
                    "POST /v1/audio/translations, GET /v1/models, GET /health"}.get(exc.status_code, exc.detail)
    return error_response(exc.status_code, message, code=codes.get(exc.status_code, "invalid_request"),
                          headers=getattr(exc, "headers", None))


async def _client_gone(request, exc):
    return Response(status_code=499)  # nobody reads it; the request simply ends


async def _internal_error(request, exc):
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


def create_app(model, config: ServeConfig) -> Starlette:
    from serinus.transcribe import can_timestamp

    batcher = Batcher(lambda jobs: decode_jobs(model, jobs, config.max_batch), config.max_batch,
                      config.max_wait_ms, config.queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop)  # requests in flight have finished by now (uvicorn waits)

    app = Starlette(
        routes=[Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
                Route("/v1/audio/translations", translations, methods=["POST"]),
                Route("/v1/models", models, methods=["GET"]),
                Route("/health", health, methods=["GET"])],
        middleware=[Middleware(Guard, api_key=config.api_key, max_bytes=int(config.max_upload_mb * 2**20))],
        exception_handlers={RequestError: _request_error, HTTPException: _http_error,
                            ClientDisconnect: _client_gone, Exception: _internal_error},
        lifespan=lifespan,
    )
    app.state.model, app.state.batcher, app.state.config = model, batcher, config
    app.state.can_timestamp = can_timestamp(model)
    return app
