"""The OpenAI-compatible app: a thin shell over `bitllm.LLM` and its running `Batch`.

    app = create_app(bitllm.LLM("model-dir"), ServeConfig(api_key="..."))

Routes: GET / (chat page), GET /health, GET /metrics, GET /v1/models, GET /v1/models/{id},
POST /v1/completions, POST /v1/chat/completions, and vLLM's tokenizer routes POST /tokenize, POST
/detokenize, GET /tokenizer_info (lm-eval's remote tokenizer). Tokenizing, chat templates,
sampling, stop strings, log-probabilities and incremental detokenization are the engine's
(`LLM.encode`, `LLM.chat_ids`, `Batch.add/step/text_delta`, `bitllm.engine.detok`); this module only
parses requests, checks limits and shapes the answers (several prompts and `n` choices: one engine
sequence each, read together by `_Answer`). User guide: docs/serve.md.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from jinja2 import TemplateError
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from bitllm.engine.detok import token_strings, visible_lengths
from bitllm.errors import BitLLMError
from bitllm.serve import protocol as P
from bitllm.serve.scheduler import EngineLoop, Metrics, QueueFull

log = logging.getLogger("bitllm.serve")

PAGE = Path(__file__).with_name("chat.html")
PUBLIC = ("/health", "/")  # the chat page is static HTML; it sends the API key with each request


@dataclass
class ServeConfig:
    """Server settings. `max_batch` sequences decode together; `max_queue` more may wait (then 429)."""

    model_name: str = "bitllm"
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    timeout: float = 300.0  # seconds from arrival to the last token, per request
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # default: the model's context - 1
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default)
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API ("*" = any); none = CORS off


def create_app(llm, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving `llm` (a bitllm.LLM with a tokenizer)."""
    cfg = config or ServeConfig()
    if llm.tokenizer is None:
        raise BitLLMError("serving needs a model with a tokenizer (text in, text out); this model has none")
    context = int(llm.backend.max_context)
    max_prompt = min(cfg.max_prompt_tokens or context - 1, context - 1)
    metrics = Metrics()
    model_card = {"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "bitllm", "max_model_len": context}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = EngineLoop(llm, max_batch=cfg.max_batch, max_queue=cfg.max_queue, timeout=cfg.timeout,
                                      metrics=metrics).start()
        try:
            yield
        finally:
            app.state.engine.stop()

    app = FastAPI(title="bitllm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config, app.state.llm, app.state.metrics = cfg, llm, metrics
    app.add_middleware(Guard, config=cfg, metrics=metrics)
    if cfg.cors_origins:  # added last, so it wraps Guard: preflights carry no API key, and 401s get CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["Retry-After"])

    # -- errors: always OpenAI's JSON shape, never a stack trace -----------------------------------

    @app.exception_handler(P.ApiError)
    async def _api_error(request: Request, e: P.ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg, loc = "the request body is not valid JSON", []
        elif not loc:  # the body as a whole: empty, not an object, or not sent as JSON
            ctype = request.headers.get("content-type") or "none"
            msg = (f"the request body must be a JSON object sent with 'Content-Type: application/json' "
                   f"(got content-type {ctype}: {msg})")
        where = ".".join(loc)
        return JSONResponse(P.error_body(f"{where}: {msg}" if where else msg, "invalid_request_error",
                                         where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(P.error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(BitLLMError)
    async def _bitllm(request: Request, e: BitLLMError):
        return JSONResponse(P.error_body(str(e), "invalid_request_error"), status_code=400)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(P.error_body("internal server error", "server_error"), status_code=500)

    # -- routes --------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8").replace("{{MODEL}}", cfg.model_name))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": cfg.model_name, **app.state.engine.info()}

    @app.get("/metrics")
    async def metrics_page() -> PlainTextResponse:
        engine: EngineLoop = app.state.engine
        waiting, live = engine.depth()
        gauges = {
            "bitllm_queue_depth": ("Requests waiting to join the batch.", waiting),
            "bitllm_active_requests": ("Requests decoding in the running batch.", live),
            "bitllm_kv_sequences": ("Sequences holding a KV cache slot in the engine.", engine.kv_sequences()),
            "bitllm_max_batch": ("Most sequences decoded in one step.", cfg.max_batch),
        }
        return PlainTextResponse(metrics.render(gauges), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str) -> dict[str, Any]:
        if model_id != cfg.model_name:
            raise P.ApiError(404, f"the model '{model_id}' does not exist; this server serves '{cfg.model_name}'",
                             param="model", code="model_not_found")
        return model_card

    @app.post("/tokenize")
    async def tokenize(body: P.TokenizeRequest) -> dict[str, Any]:
        body.check()
        if body.messages is not None:
            try:
                ids = llm.chat_ids([{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                                    for m in body.messages])
            except TemplateError as e:
                raise P.ApiError(400, f"the model's chat template refused these messages: {e}", param="messages") from None
        else:
            ids = llm.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": context, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: P.DetokenizeRequest) -> dict[str, str]:
        bad = [t for t in body.tokens if not 0 <= t < llm.backend.vocab]
        if bad:
            raise P.ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{llm.backend.vocab - 1})",
                             param="tokens")
        return {"prompt": llm.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        tok = llm.tokenizer
        return {"tokenizer_class": type(tok).__name__, "model_max_length": context,
                **{k: getattr(tok, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template")}}

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        body.unsupported()
        prompts = []  # (ids, echoed text)
        texts = body.prompts()
        _check_choices(len(texts), body.n, "prompt")  # before tokenizing: a 1 MiB body holds 100k+ prompts
        for p in texts:
            ids = llm.encode(p)
            prompts.append((ids, (p if isinstance(p, str) else llm.decode(ids)) if body.echo else None))
        return await _answer(request, body, prompts, body.max_tokens, chat=False, logprobs=body.logprobs)

    @app.post("/v1/chat/completions")
    async def chat(body: P.ChatRequest, request: Request):
        body.unsupported()
        try:
            ids = llm.chat_ids(body.as_dicts())
        except TemplateError as e:  # e.g. "roles must alternate user/assistant": the client's to fix
            raise P.ApiError(400, f"the model's chat template refused these messages: {e}", param="messages") from None
        # as LLM.chat: without a template the model sees a "User:/Assistant:" transcript; end its turn there
        turn_end = () if getattr(llm.tokenizer, "chat_template", None) else ("\nUser:",)
        if body.max_completion_tokens is not None:
            limit, param = body.max_completion_tokens, "max_completion_tokens"
        else:
            limit, param = body.max_tokens, "max_tokens"
        return await _answer(request, body, [(ids, None)], limit, chat=True, param=param, extra_stop=turn_end,
                             logprobs=(body.top_logprobs or 0) if body.logprobs else None)

    def _check_choices(prompts: int, n: int, where: str) -> None:
        if prompts * n > cfg.max_queue:
            raise P.ApiError(400, f"{prompts} prompt(s) x n = {n} is {prompts * n} choices; this server takes at "
                             f"most {cfg.max_queue} per request", param="n" if n > 1 else where)

    async def _answer(request: Request, body: P._Sampling, prompts: list[tuple[list[int], str | None]],
                      max_tokens: int | None, chat: bool, param: str = "max_tokens", extra_stop: tuple[str, ...] = (),
                      logprobs: int | None = None):
        """Every prompt x `n` choices become sequences of the running batch (choice index p * n + j)."""
        where = "messages" if chat else "prompt"
        _check_choices(len(prompts), body.n, where)
        engine: EngineLoop = app.state.engine
        jobs, choices = [], []  # (ids, params) per choice; (echo, logprob shaper, lead) per choice
        for ids, echo in prompts:
            if len(ids) > max_prompt:
                raise P.ApiError(400, f"the prompt has {len(ids)} tokens; this server accepts at most {max_prompt}",
                                 param=where, code="context_length_exceeded")
            limit = max_tokens
            if limit is None:
                limit = min(cfg.max_tokens, context - len(ids)) if chat else cfg.default_max_tokens
            if limit > cfg.max_tokens:
                raise P.ApiError(400, f"{param} is {limit}; this server allows at most {cfg.max_tokens}", param=param)
            scored = echo is not None and logprobs is not None
            lead = len(jobs)  # the prompt's first choice: the one that scores an echoed prompt
            for j in range(body.n):
                # top_p 0 keeps only the most likely token: greedy (SamplingParams itself wants 0 < top_p <= 1)
                greedy = body.top_p == 0
                params = llm.sampling_params(
                    max_new_tokens=limit, temperature=0.0 if greedy else body.temperature,
                    top_p=1.0 if greedy else body.top_p,
                    seed=None if body.seed is None else (body.seed + j) % (1 << 64),  # n choices, n samples
                    stop=tuple(body.stop or ()) + extra_stop, top_k=body.top_k,
                    repetition_penalty=body.repetition_penalty, ignore_eos=body.ignore_eos,
                    logprobs=logprobs, prompt_logprobs=logprobs if scored and j == 0 else None)
                try:  # the engine's own checks (token ids, stops), here: a stream has not answered 200 yet
                    engine.batch.check(ids, params)
                except BitLLMError as e:
                    raise P.ApiError(400, str(e), param=where) from None
                jobs.append((ids, params))
                choices.append((echo, _Logprobs(llm.tokenizer, chat, ids, echo) if logprobs is not None else None,
                                lead if scored and j > 0 else None))
        try:
            reqs = engine.submit_many(jobs, n=body.n)
        except QueueFull as e:
            raise P.ApiError(429, str(e), "rate_limit_error", code="server_busy",
                             headers={"Retry-After": str(e.retry_after)}) from None
        answer = _Answer(engine, reqs, choices, P.new_id("chatcmpl" if chat else "cmpl"),
                         cfg.model_name,  # the model that answered, whatever name the client asked for (as OpenAI)
                         chat, sum(len(ids) for ids, _ in prompts))
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(answer.stream(usage), sep="\n", ping=15)
        return await answer.collect(request)

    return app


class _Logprobs:
    """One request's log-probability records in OpenAI's shapes: token texts in context
    (`bitllm.engine.detok`), offsets into the answer's text (which starts with the echoed prompt)."""

    def __init__(self, tokenizer, chat: bool, prompt_ids: list[int], echo: str | None) -> None:
        self.tok, self.chat, self.prompt_ids = tokenizer, chat, prompt_ids
        self.start = len(echo) if echo is not None else 0  # where the completion's text begins
        self.ids: list[int] = []  # generated tokens so far: the context of the next pieces
        self.width = 0  # characters of completion text the pieces so far cover

    def _positions(self, ids: list[int], start: int, records: list, at: int) -> tuple[list[tuple], int]:
        """The positions of ids[start:] (their pieces start at offset `at`) and the offset after them."""
        alts = [[t for t, _ in r.top] if r is not None else [] for r in records]
        pieces, alt_pieces = token_strings(self.tok, ids, start, alts)
        out = []
        for piece, rec, alt, n in zip(pieces, records, alt_pieces, visible_lengths(self.tok, ids[start:], pieces)):
            out.append((piece, rec, alt, at))
            at += n
        return out, at

    def prompt(self, records: list) -> list[tuple]:
        """The prompt's positions: a tokenizer call per token and alternative (up to 21 x the context),
        so the handlers run it in a worker thread, never on the event loop."""
        return self._positions(self.prompt_ids, 0, records, 0)[0]

    def generated(self, records: list) -> list[tuple]:
        start = len(self.ids)
        self.ids += [r.token for r in records]
        out, end = self._positions(self.ids, start, records, self.start + self.width)
        self.width = end - self.start
        return out

    def trim(self, positions: list[tuple], text_len: int) -> list[tuple]:
        """Without the tokens a stop string cut from the text (they start at or past its end)."""
        if self.width <= text_len:
            return positions
        return [p for p in positions if p[3] < self.start + text_len]

    def shape(self, positions: list[tuple]) -> dict:
        return P.chat_logprobs(positions) if self.chat else P.completion_logprobs(positions)


def _error_kind(status: int) -> str:
    return "timeout" if status == 504 else "server_error" if status >= 500 else "invalid_request_error"


class _Answer:
    """One HTTP request's choices (one engine request each) read together: their events merged into
    one queue as (choice index, event). If the client goes away, or one choice fails, the choices
    still running are cancelled (their KV cache slots freed).

    An echoed prompt with log-probabilities is scored once, by its first choice (its `lead`): the
    records depend only on the prompt, so the prompt's other choices reuse them, and their events
    are held back until they are in (the echoed prompt comes first in each choice)."""

    def __init__(self, engine: EngineLoop, reqs: list, choices: list[tuple], id_: str, model: str, chat: bool,
                 prompt_tokens: int) -> None:
        self.engine, self.reqs, self.choices = engine, reqs, choices  # choices: (echo, shaper, lead or None)
        self.id, self.model, self.chat, self.prompt_tokens = id_, model, chat, prompt_tokens
        self.done = [False] * len(reqs)
        self.prompt_in = [asyncio.Event() for _ in reqs]  # its prompt's records are in
        self.merged: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []

    def _sharing(self, i: int) -> list[int]:
        """The choices whose echoed prompt is scored by choice i: itself and the ones it leads."""
        return [k for k, (_, _, lead) in enumerate(self.choices) if k == i or lead == i]

    def _start(self) -> None:
        async def forward(i: int, req) -> None:
            lead = self.choices[i][2]
            if lead is not None:
                await self.prompt_in[lead].wait()
            while True:
                ev = await req.events.get()
                self.merged.put_nowait((i, ev))
                if ev.kind in ("done", "error"):
                    return

        self.tasks = [asyncio.ensure_future(forward(i, r)) for i, r in enumerate(self.reqs)]

    def _stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for i, req in enumerate(self.reqs):
            if not self.done[i]:
                self.engine.cancel(req)

    async def collect(self, request: Request) -> JSONResponse:
        """Wait for every choice; cancel them if the client goes away meanwhile."""
        n = len(self.reqs)
        parts: list[list[str]] = [[] for _ in range(n)]
        prompt_pos: list[list[tuple]] = [[] for _ in range(n)]
        positions: list[list[tuple]] = [[] for _ in range(n)]
        out: list[dict | None] = [None] * n
        completion_tokens = 0
        check = time.monotonic() + 0.25
        self._start()
        try:
            while not all(self.done):
                try:
                    i, ev = await asyncio.wait_for(self.merged.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    i, ev = None, None
                if time.monotonic() >= check:  # events may keep coming: look at the connection on a clock
                    check = time.monotonic() + 0.25
                    if await request.is_disconnected():
                        return JSONResponse(P.error_body("client disconnected", "invalid_request_error"), status_code=499)
                if ev is None:
                    continue
                echo, lp, _ = self.choices[i]
                if ev.kind == "prompt":
                    shaped = await asyncio.to_thread(lp.prompt, ev.logprobs)
                    for k in self._sharing(i):
                        prompt_pos[k] = shaped
                    self.prompt_in[i].set()
                elif ev.kind == "text":
                    parts[i].append(ev.text)
                    if lp is not None:
                        positions[i] += lp.generated(ev.logprobs)
                elif ev.kind == "error":
                    self.done[i] = True
                    raise P.ApiError(ev.status, ev.text, _error_kind(ev.status))
                else:
                    self.done[i] = True
                    text = "".join(parts[i])
                    logprobs = lp.shape(prompt_pos[i] + lp.trim(positions[i], len(text))) if lp is not None else None
                    make = P.chat_choice if self.chat else P.completion_choice
                    out[i] = make(i, (echo or "") + text, ev.finish_reason, logprobs)
                    completion_tokens += ev.completion_tokens
            return JSONResponse(P.body(self.id, self.model, self.chat, out, self.prompt_tokens, completion_tokens))
        finally:
            self._stop()

    async def stream(self, include_usage: bool):
        """Server-sent events in OpenAI's chunk format, each chunk one choice's (its `index`), ending
        with `data: [DONE]`. If the client disconnects, sse-starlette cancels this generator and
        `finally` cancels the choices. An echoed prompt is its choice's first chunk (with its
        log-probabilities, once the prompt has been fed, if asked)."""
        chunk = P.chat_chunk if self.chat else P.completion_chunk
        completion_tokens = 0
        self._start()
        try:
            for i, (echo, lp, _) in enumerate(self.choices):
                if self.chat:
                    yield json.dumps(chunk(self.id, self.model, {"role": "assistant", "content": ""}, None, index=i))
                elif echo is not None and lp is None:
                    yield json.dumps(chunk(self.id, self.model, echo, None, index=i))
            held = None
            while not all(self.done):
                (i, ev), held = held or await self.merged.get(), None
                echo, lp, _ = self.choices[i]
                if ev.kind == "prompt":
                    shaped = lp.shape(await asyncio.to_thread(lp.prompt, ev.logprobs))
                    for k in self._sharing(i):
                        yield json.dumps(chunk(self.id, self.model, echo, None, shaped, index=k))
                    self.prompt_in[i].set()
                elif ev.kind == "text":
                    text, records = ev.text, list(ev.logprobs)
                    while not self.merged.empty():  # a slow reader gets the pieces that piled up as one chunk
                        nxt = self.merged.get_nowait()
                        if nxt[0] != i or nxt[1].kind != "text":
                            held = nxt
                            break
                        text += nxt[1].text
                        records += nxt[1].logprobs
                    logprobs = lp.shape(lp.generated(records)) if lp is not None else None
                    yield json.dumps(chunk(self.id, self.model, {"content": text} if self.chat else text, None,
                                           logprobs, index=i))
                elif ev.kind == "error":
                    self.done[i] = True
                    yield json.dumps(P.error_body(ev.text, _error_kind(ev.status)))
                    break
                else:
                    self.done[i] = True
                    completion_tokens += ev.completion_tokens
                    yield json.dumps(chunk(self.id, self.model, {} if self.chat else "", ev.finish_reason, index=i))
            else:
                if include_usage:
                    yield json.dumps(P.usage_chunk(self.id, self.model, "chat.completion.chunk" if self.chat else
                                                   "text_completion", self.prompt_tokens, completion_tokens))
            yield "[DONE]"
        finally:
            self._stop()


class Guard:
    """ASGI middleware: API key, request-size limit, and a per-endpoint count of answers."""

    def __init__(self, app, config: ServeConfig, metrics: Metrics) -> None:
        self.app, self.cfg, self.metrics = app, config, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ("/", "/health", "/metrics", "/v1/models", "/v1/completions",
                                    "/v1/chat/completions", "/tokenize", "/detokenize", "/tokenizer_info") else "other"
        status = {"code": 500}

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.cfg.api_key and path not in PUBLIC and not self._authorized(scope):
                return await self._reject(counted_send, 401, "missing or wrong API key: send "
                                          "'Authorization: Bearer <key>'", "authentication_error", "invalid_api_key")
            length = dict(scope.get("headers", [])).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.cfg.max_body_bytes):
                return await self._reject(counted_send, 413, f"the request body is larger than "
                                          f"{self.cfg.max_body_bytes} bytes", "invalid_request_error", "request_too_large")
            await self.app(scope, self._limited(receive), counted_send)
        finally:
            self.metrics.request(endpoint, status["code"])

    def _authorized(self, scope) -> bool:
        auth = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin-1")
        token = auth[7:] if auth[:7].lower() == "bearer " else ""
        return hmac.compare_digest(token.encode(), self.cfg.api_key.encode())

    def _limited(self, receive):
        seen = {"n": 0}

        async def wrapped():
            message = await receive()
            if message["type"] == "http.request":
                seen["n"] += len(message.get("body", b""))
                if seen["n"] > self.cfg.max_body_bytes:
                    raise P.ApiError(413, f"the request body is larger than {self.cfg.max_body_bytes} bytes",
                                     code="request_too_large")
            return message

        return wrapped

    @staticmethod
    async def _reject(send, status: int, message: str, type_: str, code: str) -> None:
        body = json.dumps(P.error_body(message, type_, None, code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
