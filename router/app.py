"""The router's HTTP front door (aiohttp): Triton's generate / generate_stream per model, OpenAI-compatible
completions and chat completions (SSE streaming) and model list, an OpenAPI description, a management API
(deploy, hosts, requests, migrate, drain) and Prometheus metrics."""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import time
import uuid

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .config import ConfigError, ModelSpec, RouterConfig, check_name
from .lifecycle import Manager, RouterError
from .migration import StreamSession
from .placement import make_policy
from .state import Host, Poller

log = logging.getLogger("tritonmoe.router")
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "min_tokens", "ignore_eos")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class Router:
    def __init__(self, cfg: RouterConfig, policy_seed: int | None = None):
        self.cfg = cfg
        self.hosts = [Host(h) for h in cfg.hosts]
        self.registry = CollectorRegistry()
        self.manager = Manager(cfg, self.hosts, make_policy(cfg.policy, policy_seed), self.registry)
        self.poller = Poller(self.hosts, cfg.poll_interval_s)
        self.poller.on_server_lost = self.manager.server_lost
        self.poller.on_first_poll = self.manager.adopt  # models already loaded (a restarted router)
        self.sessions: dict[str, StreamSession] = {}
        self.manager.sessions = self.sessions  # placement-driven migration moves running requests
        self.finished: collections.deque = collections.deque(maxlen=256)  # recent requests, for /admin/requests
        r = self.registry
        self.m_requests = Counter("tritonmoe_router_requests", "Requests by outcome", ["model", "outcome"],
                                  registry=r)
        self.m_ttft = Histogram("tritonmoe_router_time_to_first_token_seconds", "Router-side TTFT", ["model"],
                                buckets=(.01, .025, .05, .1, .25, .5, 1, 2, 4, 8, 16, 32, 64), registry=r)
        self.m_e2e = Histogram("tritonmoe_router_request_seconds", "Router-side end-to-end latency", ["model"],
                               buckets=(.05, .1, .25, .5, 1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.m_failovers = Counter("tritonmoe_router_failovers", "Streams resumed on another server", registry=r)
        self.m_migrations = Counter("tritonmoe_router_migrations", "Planned live migrations", registry=r)

    # ---- app ---------------------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=4 * 2**20)
        app.add_routes([
            web.get("/health", self.h_health),
            web.get("/metrics", self.h_metrics),
            web.get("/openapi.json", self.h_openapi),
            web.get("/v1/models", self.h_models),
            web.post("/v1/completions", self.h_completions),
            web.post("/v1/chat/completions", self.h_chat),
            web.post("/v2/models/{model}/generate", self.h_generate),
            web.post("/v2/models/{model}/generate_stream", self.h_generate_stream),
            web.get("/admin/hosts", self.h_hosts),
            web.get("/admin/models", self.h_admin_models),
            web.post("/admin/models", self.h_deploy),
            web.delete("/admin/models/{model}", self.h_undeploy),
            web.get("/admin/requests", self.h_requests),
            web.post("/admin/requests/{rid}/migrate", self.h_migrate),
            web.post("/admin/hosts/{host}/drain", self.h_drain),
        ])
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app) -> None:
        await self.poller.start()
        await self.manager.start()

    async def _on_cleanup(self, app) -> None:
        await self.manager.stop()
        await self.poller.stop()
        for h in self.hosts:
            try:
                await h.close()
            except Exception:  # noqa: BLE001
                pass

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        if self.cfg.token and request.path != "/health":
            auth = request.headers.get("Authorization", "")
            if not (auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].strip(), self.cfg.token)):
                return _error(401, "missing or wrong bearer token")
        try:
            return await handler(request)
        except RouterError as e:
            return _error(e.status, str(e))
        except ConfigError as e:
            return _error(400, str(e))

    # ---- helpers -----------------------------------------------------------------------------------------------
    async def _body(self, request: web.Request) -> dict:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise RouterError(400, "the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise RouterError(400, "the body must be a JSON object")
        return body

    def _model(self, name) -> str:
        if not isinstance(name, str):
            raise RouterError(400, "'model' must be a string")
        check_name(name)
        self.manager.spec(name)
        return name

    def _session(self, model: str, prompt, sampling: dict) -> StreamSession:
        if not isinstance(prompt, str) or not prompt:
            raise RouterError(400, "the prompt must be a non-empty string")
        return StreamSession(self.manager, model, prompt, sampling, self.sessions)

    async def _collect(self, session: StreamSession):
        """Run a whole (non-streaming) request and record it: (text, token ids, last delta)."""
        t0 = time.monotonic()
        text, ids, last = [], [], None
        try:
            async for d in session.run():
                text.append(d.text)
                ids.extend(d.token_ids)
                last = d
        except RouterError:
            self._record(session, t0, None, "error")
            raise
        self._record(session, t0, None, "ok")
        return "".join(text), ids, last

    @staticmethod
    def _usage(last) -> dict:
        return {"prompt_tokens": last.num_input_tokens, "completion_tokens": last.num_output_tokens,
                "total_tokens": last.num_input_tokens + last.num_output_tokens}

    async def _first(self, gen):
        """The first delta, so errors before it become an HTTP status instead of a broken event stream."""
        try:
            return await gen.__anext__()
        except StopAsyncIteration:
            raise RouterError(502, "the server ended the stream without output") from None

    def _record(self, session: StreamSession, t0: float, ttft: float | None, outcome: str) -> None:
        self.finished.append({**session.info(), "outcome": outcome, "seconds": time.monotonic() - t0,
                              "ttft_s": ttft})
        self.m_requests.labels(session.model, outcome).inc()
        if ttft is not None:
            self.m_ttft.labels(session.model).observe(ttft)
        self.m_e2e.labels(session.model).observe(time.monotonic() - t0)
        self.m_failovers.inc(session.failovers)
        self.m_migrations.inc(session.migrations)

    async def _sse(self, request: web.Request, session: StreamSession, render, done_line: str | None):
        t0 = time.monotonic()
        gen = session.run()
        try:
            first = await self._first(gen)
        except RouterError:
            self._record(session, t0, None, "error")
            await gen.aclose()
            raise
        ttft = time.monotonic() - t0
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Request-Id": session.id})
        await resp.prepare(request)
        outcome = "ok"
        try:
            d = first
            while True:
                await resp.write(f"data: {json.dumps(render(d))}\n\n".encode())
                if d.finish_reason:
                    break
                try:
                    d = await gen.__anext__()
                except StopAsyncIteration:
                    break
        except RouterError as e:
            outcome = "error"
            await resp.write(f"data: {json.dumps({'error': str(e)})}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            outcome = "client_gone"
            await gen.aclose()
            raise
        finally:
            self._record(session, t0, ttft, outcome)
        await gen.aclose()
        if done_line:
            await resp.write(done_line.encode())
        await resp.write_eof()
        return resp

    # ---- Triton generate ---------------------------------------------------------------------------------------
    def _triton_request(self, request: web.Request, body: dict):
        model = self._model(request.match_info["model"])
        unknown = set(body) - {"text_input", "stream", "sampling_parameters", "parameters",
                               "exclude_input_in_output", "id"}
        if unknown:
            raise RouterError(400, f"unknown field(s) {sorted(unknown)}; accepted: text_input, stream, "
                              "sampling_parameters, parameters, exclude_input_in_output")
        sampling = {}
        if body.get("sampling_parameters") is not None:
            raw = body["sampling_parameters"]
            try:
                sampling = json.loads(raw) if isinstance(raw, str) else raw
            except ValueError:
                raise RouterError(400, "'sampling_parameters' is not valid JSON") from None
            if not isinstance(sampling, dict):
                raise RouterError(400, "'sampling_parameters' must be a JSON object")
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise RouterError(400, "'parameters' must be an object")
        sampling = {**sampling, **params}
        if "text_input" not in body:
            raise RouterError(400, "missing required field 'text_input'")
        return model, body["text_input"], sampling

    def _triton_event(self, model: str, d, text: str, ids: list[int]) -> dict:
        return {"model_name": model, "model_version": "1", "text_output": text, "num_input_tokens":
                d.num_input_tokens, "num_output_tokens": d.num_output_tokens, "finish_reason": d.finish_reason,
                "output_token_ids": ids}

    async def h_generate(self, request):
        body = await self._body(request)
        model, prompt, sampling = self._triton_request(request, body)
        session = self._session(model, prompt, sampling)
        text, ids, last = await self._collect(session)
        if not body.get("exclude_input_in_output"):
            text = prompt + text
        return web.json_response(self._triton_event(model, last, text, ids), headers={"X-Request-Id": session.id})

    async def h_generate_stream(self, request):
        body = await self._body(request)
        model, prompt, sampling = self._triton_request(request, body)
        session = self._session(model, prompt, sampling)
        return await self._sse(request, session, lambda d: self._triton_event(model, d, d.text, d.token_ids), None)

    # ---- OpenAI ------------------------------------------------------------------------------------------------
    def _openai_sampling(self, body: dict) -> dict:
        if body.get("n", 1) != 1:
            raise RouterError(400, "'n' must be 1")
        sampling = {k: body[k] for k in SAMPLING_KEYS if body.get(k) is not None}
        sampling.setdefault("max_tokens", 16)
        sampling.setdefault("temperature", 1.0)  # OpenAI's default
        return sampling

    async def h_completions(self, request):
        body = await self._body(request)
        model = self._model(body.get("model"))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        session = self._session(model, prompt, self._openai_sampling(body))
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(d):
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": d.text, "logprobs": None,
                                 "finish_reason": d.finish_reason or None}]}

        if body.get("stream"):
            return await self._sse(request, session, chunk, "data: [DONE]\n\n")
        text, ids, last = await self._collect(session)
        return web.json_response({
            "id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}],
            "usage": self._usage(last)})

    @staticmethod
    def chat_prompt(messages) -> str:
        """A plain role-prefixed transcript ending with the assistant's turn (the tiny models carry no chat
        template; a model's own template is future work)."""
        if not isinstance(messages, list) or not messages:
            raise RouterError(400, "'messages' must be a non-empty list")
        lines = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise RouterError(400, f"messages[{i}] must be {{'role': system|user|assistant, 'content': str}}")
            lines.append(f"{m['role']}: {m['content']}")
        return "\n".join(lines) + "\nassistant:"

    async def h_chat(self, request):
        body = await self._body(request)
        model = self._model(body.get("model"))
        prompt = self.chat_prompt(body.get("messages"))
        session = self._session(model, prompt, self._openai_sampling(body))
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        first = [True]

        def chunk(d):
            delta = {"content": d.text}
            if first[0]:
                delta["role"], first[0] = "assistant", False
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": d.finish_reason or None}]}

        if body.get("stream"):
            return await self._sse(request, session, chunk, "data: [DONE]\n\n")
        text, ids, last = await self._collect(session)
        return web.json_response({
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": last.finish_reason}],
            "usage": self._usage(last)})

    async def h_models(self, request):
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "tritonmoe",
             "instances": sum(1 for h in self.hosts if h.ready_instance(name))}
            for name in sorted(self.manager.specs)]})

    # ---- management --------------------------------------------------------------------------------------------
    async def h_health(self, request):
        return web.json_response({"status": "ok", "healthy_hosts": sum(h.healthy for h in self.hosts),
                                  "hosts": len(self.hosts)})

    async def h_metrics(self, request):
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def h_hosts(self, request):
        hosts = []
        for h in self.hosts:
            snap = h.snapshot()
            if h.pool is not None:  # the router's own cold starts on that device that have not claimed yet
                snap["engine_pool_view"]["router_pending"] = self.manager.pool_pending(h.pool, h.pool_device)
            hosts.append(snap)
        return web.json_response({"hosts": hosts, "policy": self.cfg.policy,
                                  "loaded_seconds": self.manager.loaded_seconds(),
                                  "cold_starts": self.manager.cold_starts,
                                  "placement_migration": self.cfg.placement_migration,
                                  "placement_decisions": list(self.manager.placement_log),
                                  "adopted": self.manager.adopted})

    async def h_admin_models(self, request):
        return web.json_response({"models": [
            {"name": s.name, "checkpoint": s.checkpoint, "parameters": s.parameters, "min_instances":
             s.min_instances, "max_instances": s.max_instances, "target_concurrency": s.target_concurrency,
             "keep_alive_s": s.keep_alive_s, "use_loader": s.use_loader, "use_engine_pool": s.use_engine_pool,
             "instances": [h.name for h in self.hosts if h.ready_instance(s.name)],
             "last_load_error": (self.manager.load_failures.get(s.name) or (0, None))[1]}
            for s in self.manager.specs.values()]})

    async def h_deploy(self, request):
        body = await self._body(request)
        name = body.pop("name", None)
        spec = ModelSpec.parse(name, body)
        self.manager.deploy(spec)
        return web.json_response({"deployed": spec.name}, status=201)

    async def h_undeploy(self, request):
        name = check_name(request.match_info["model"])
        await self.manager.undeploy(name)
        return web.json_response({"deleted": name})

    async def h_requests(self, request):
        return web.json_response({"requests": [s.info() for s in self.sessions.values()],
                                  "finished": list(self.finished)})

    async def h_migrate(self, request):
        session = self.sessions.get(request.match_info["rid"])
        if session is None:
            raise RouterError(404, f"no running request {request.match_info['rid']!r}")
        body = await self._body(request) if request.can_read_body else {}
        target, at_token = body.get("host"), body.get("at_token")
        if target is not None and target not in {h.name for h in self.hosts}:
            raise RouterError(400, f"unknown host {target!r}")
        if at_token is not None and (not isinstance(at_token, int) or at_token < 1):
            raise RouterError(400, "'at_token' must be an integer >= 1")
        await session.migrate(target, at_token)
        return web.json_response({"migrating": session.id, "info": session.info()})

    async def h_drain(self, request):
        """Move every running request off a host (for maintenance or to free it for another model)."""
        name = request.match_info["host"]
        if name not in {h.name for h in self.hosts}:
            raise RouterError(404, f"unknown host {name!r}")
        moved, failed = [], {}
        for s in list(self.sessions.values()):
            if name in s.info()["hosts"]:
                try:
                    await s.migrate(None)
                    moved.append(s.id)
                except RouterError as e:
                    failed[s.id] = str(e)
        return web.json_response({"moved": moved, "failed": failed})

    async def h_openapi(self, request):
        from .openapi import spec
        return web.json_response(spec())
