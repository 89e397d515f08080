"""One client request as a stream that can move between servers (token-based live migration and failover).

Every request runs upstream as a streaming gRPC request. The router keeps the token ids and the number of text
characters the client has been sent; that is all another server needs to continue (``resume_state``): it
recomputes the KV cache from prompt + tokens by prefill and goes on generating. Greedy and seeded sampling are
deterministic per token index (the backend seeds each token from (seed, index)), so every upstream of one request
produces the same token sequence, and the router merges them by position: whichever upstream is ahead supplies
the client's next tokens; positions already sent are checked against, not re-sent.

Migration: the destination starts from the tokens so far while the source keeps streaming to the client (the
destination's prefill overlaps the source's decoding); once the destination has produced output, the source is
cancelled, and the destination's first tokens, which the source already sent, are checked and skipped. The client
waits only for the few tokens the source made during the destination's prefill (at decode speed), never for a
load or a prefill. When the source got more than ``migration_handover_tokens`` ahead during a round (a slow first
step on the destination), the destination starts another round from the tokens so far, up to
``migration_rounds`` rounds. A destination that produces nothing within ``migration_overlap_s`` is dropped and the
source carries on. The backend keeps no KV cache across requests, so each round redoes the whole prefill (in
ServerlessLLM a round recomputes only the new tokens); rounds help when the first was slowed by something
transient, and the overlap keeps the client's stream flowing during all of them.

Failover: an upstream that errors (server killed, stream silent past the timeout, dead Python stub) is replaced by
a resume on another host through the same path, up to ``max_failovers`` times.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
import uuid
from dataclasses import dataclass, field

from . import upstream
from .lifecycle import Manager, RouterError
from .state import Instance

log = logging.getLogger("tritonmoe.router")
_ids = itertools.count()


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str = ""
    num_input_tokens: int = 0
    num_output_tokens: int = 0


@dataclass
class _Upstream:
    uid: int
    inst: Instance
    start_tokens: int
    start_chars: int
    tokens_end: int = 0
    chars_end: int = 0
    got_output: bool = False
    task: asyncio.Task | None = None
    started: float = field(default_factory=time.monotonic)
    migration: bool = False


class StreamSession:
    def __init__(self, manager: Manager, model: str, prompt: str, sampling: dict, registry: dict | None = None):
        self.m, self.model, self.prompt = manager, model, prompt
        self.cfg = manager.cfg
        self.sampling = dict(sampling)
        temp = self.sampling.get("temperature", 0)
        if self.cfg.seed_sampled and isinstance(temp, (int, float)) and temp > 0 and self.sampling.get("seed") is None:
            # an unseeded sampled stream could not be resumed identically elsewhere
            self.sampling["seed"] = random.getrandbits(62)
        self.id = uuid.uuid4().hex[:16]
        self.tokens: list[int] = []
        self.chars = 0
        self.num_input_tokens = 0
        self.upstreams: dict[int, _Upstream] = {}
        self.events: asyncio.Queue = asyncio.Queue()
        self.failovers = 0
        self.migrations = 0
        self.hosts_used: list[str] = []
        self.registry = registry
        self.migrate_to: asyncio.Queue = asyncio.Queue()
        self.max_gap_s = 0.0  # longest pause between client deltas after the first (migration stall)
        self.handover_at: list[int] = []  # token positions where a migration's source was stopped
        self.migration_log: list[dict] = []
        self.scheduled: list[tuple[int, str | None]] = []  # (token position, target) of planned migrations
        self.done = False  # the stream ended: a migration asked for now fails instead of waiting forever
        self.first_token_at: float | None = None  # monotonic time the first token reached the router

    # ---- upstream tasks ----------------------------------------------------------------------------------------
    async def _open(self, exclude: set[str] = frozenset(), host: str | None = None, migration: bool = False):
        if host is not None:
            inst = await self.m.acquire(self.model, exclude={h.name for h in self.m.hosts if h.name != host},
                                        allow_migration=False)
        else:
            inst = await self.m.acquire(self.model, exclude=exclude)
        up = _Upstream(next(_ids), inst, len(self.tokens), self.chars, len(self.tokens), self.chars,
                       migration=migration)
        resume = ({"output_token_ids": list(self.tokens), "text_chars_sent": self.chars} if self.tokens else None)
        if resume is None and self.chars:
            raise RouterError(500, "cannot resume: text was sent but no token ids are known")
        self.upstreams[up.uid] = up
        self.hosts_used.append(inst.host.name)
        up.task = asyncio.create_task(self._pump(up, resume))
        return up

    async def _pump(self, up: _Upstream, resume: dict | None) -> None:
        gen = upstream.stream_generate(up.inst.host.client, self.model, self.prompt, self.sampling, resume,
                                       f"{self.id}-{up.uid}")
        t0 = time.monotonic()
        try:
            while True:
                timeout = self.cfg.token_timeout_s if up.got_output else self.cfg.first_token_timeout_s
                try:
                    chunk = await asyncio.wait_for(gen.__anext__(), timeout)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise upstream.UpstreamError("hung", f"host {up.inst.host.name} sent nothing for {timeout:.0f}s")
                up.got_output = True
                await self.events.put((up.uid, chunk, None))
                if chunk.final:
                    return
        except upstream.UpstreamError as e:
            await self.events.put((up.uid, None, e))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            await self.events.put((up.uid, None, upstream.UpstreamError("server", repr(e))))
        finally:
            await gen.aclose()
            self.m.release(up.inst, time.monotonic() - t0)

    def _drop(self, up: _Upstream) -> None:
        self.upstreams.pop(up.uid, None)
        if up.task and not up.task.done():
            up.task.cancel()  # closes the gRPC stream: the server cancels the request

    def source_instance(self) -> Instance | None:
        """The instance this request runs on, when it runs on exactly one (no migration in progress)."""
        if len(self.upstreams) != 1:
            return None
        up = next(iter(self.upstreams.values()))
        return None if up.migration else up.inst

    def remaining_s(self) -> float | None:
        """Seconds until this stream reaches its max_tokens at the token rate it has shown so far (None before its
        second token). An upper bound: an end-of-sequence token or a stop string can end it sooner."""
        if self.done:
            return 0.0
        n = len(self.tokens)
        if self.first_token_at is None or n < 2:
            return None
        rate = (n - 1) / max(time.monotonic() - self.first_token_at, 1e-6)
        return max(int(self.sampling.get("max_tokens", n)) - n, 0) / rate

    def migratable(self) -> bool:
        return bool(self.tokens) and self.source_instance() is not None and not self.scheduled

    # ---- the merged stream -------------------------------------------------------------------------------------
    async def run(self):
        """Yield Delta objects for the client. Raises RouterError before the first delta; after it, errors end
        the stream with a Delta whose finish_reason is 'error'."""
        if self.registry is not None:
            self.registry[self.id] = self
        try:
            async for d in self._run():
                yield d
        finally:
            self.done = True
            for up in list(self.upstreams.values()):
                self._drop(up)
            while not self.migrate_to.empty():  # migrations asked for while it was ending
                _, fut = self.migrate_to.get_nowait()
                if not fut.done():
                    fut.set_exception(RouterError(409, "the request finished before it could migrate"))
            if self.registry is not None:
                self.registry.pop(self.id, None)

    async def _run(self):
        await self._open()
        last_delta = None
        while True:
            getter = asyncio.ensure_future(self.events.get())
            mig = asyncio.ensure_future(self.migrate_to.get())
            done, _ = await asyncio.wait({getter, mig}, return_when=asyncio.FIRST_COMPLETED)
            if mig in done:
                getter.cancel()
                target, fut = mig.result()
                try:
                    await self._start_migration(target)
                    fut.set_result(True)
                except Exception as e:  # noqa: BLE001
                    fut.set_exception(e)
                if getter.done() and not getter.cancelled():
                    self.events.put_nowait(getter.result())
                continue
            mig.cancel()
            uid, chunk, err = getter.result()
            up = self.upstreams.get(uid)
            if up is None:
                continue  # a dropped upstream's last words
            if err is not None:
                await self._on_error(up, err)
                continue
            delta = self._merge(up, chunk)
            now = time.monotonic()
            if delta is not None:
                if last_delta is not None:
                    self.max_gap_s = max(self.max_gap_s, now - last_delta)
                last_delta = now
                yield delta
                if delta.finish_reason:
                    return
            await self._maybe_handover()
            due = [m for m in self.scheduled if m[0] <= len(self.tokens)]
            for m in due:
                self.scheduled.remove(m)
                try:
                    await self._start_migration(m[1])
                except RouterError as e:
                    log.warning("request %s: scheduled migration failed: %s", self.id, e)

    def _merge(self, up: _Upstream, chunk: upstream.Chunk) -> Delta | None:
        if chunk.num_input_tokens:
            self.num_input_tokens = chunk.num_input_tokens
        before_t, before_c = up.tokens_end, up.chars_end
        up.tokens_end += len(chunk.token_ids)
        up.chars_end += len(chunk.text)
        # positions this upstream repeats must agree with what the client already has
        overlap = self.tokens[before_t:up.tokens_end]
        if overlap and overlap != chunk.token_ids[:len(overlap)]:
            log.error("request %s: host %s diverged at token %d (%s != %s); dropping it", self.id,
                      up.inst.host.name, before_t, chunk.token_ids[:len(overlap)], overlap)
            self._drop(up)
            return None
        new_ids = chunk.token_ids[len(self.tokens) - before_t:] if up.tokens_end > len(self.tokens) else []
        new_text = chunk.text[self.chars - before_c:] if up.chars_end > self.chars else ""
        leader = up.tokens_end >= len(self.tokens)
        if new_ids and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.tokens.extend(new_ids)
        self.chars += len(new_text)
        finish = chunk.finish_reason if (chunk.final and leader) else ""
        if chunk.final and not leader:
            self._drop(up)
        if not (new_ids or new_text or finish):
            return None
        return Delta(new_text, new_ids, finish, self.num_input_tokens, len(self.tokens))

    async def _on_error(self, up: _Upstream, err: upstream.UpstreamError) -> None:
        host = up.inst.host
        self._drop(up)
        if err.kind == "request":
            if not self.tokens and not self.upstreams:
                raise RouterError(400, str(err))
            raise RouterError(502, f"upstream error after {len(self.tokens)} tokens: {err}")
        if err.kind in ("server", "hung") and await self._reachable(host):
            # the server answers, so the silence is the model instance's: a stub that died mid-request leaves
            # the request hanging and the model READY; a probe gets the stub's error (or hangs as well)
            probe = await upstream.probe(host.client, self.model, min(5.0, self.cfg.token_timeout_s))
            if probe is not None and probe.kind in ("stub", "hung"):
                err = upstream.UpstreamError("stub", f"{err} (probe: {probe})")
        if err.kind == "model":
            self.m.server_lost(host, self.model)  # unloaded behind the router's back: forget the instance
        if err.kind == "stub":
            self.m.mark_dead(up.inst, str(err))
        elif err.kind in ("server", "hung"):
            if err.kind == "hung" or not await self._reachable(host):
                host.healthy = False  # the poller brings it back when it answers again
                log.warning("host %s marked unhealthy: %s", host.name, err)
        log.warning("request %s: upstream on %s failed after %d tokens (%s: %s)", self.id, host.name,
                    len(self.tokens), err.kind, err)
        if self.upstreams:
            return  # a migration destination (or source) carries on
        if self.failovers >= self.cfg.max_failovers:
            raise RouterError(502, f"request failed on {self.failovers + 1} servers; last error: {err}")
        self.failovers += 1
        await self._open(exclude={host.name})

    async def _reachable(self, host) -> bool:
        try:
            return await asyncio.wait_for(host.client.is_server_live(), 2.0)
        except Exception:  # noqa: BLE001
            return False

    # ---- planned migration -------------------------------------------------------------------------------------
    async def migrate(self, target: str | None = None, at_token: int | None = None) -> None:
        """Ask the running stream to move to ``target`` (a host name; None: the policy's choice elsewhere), now
        or once ``at_token`` tokens have been sent (then this returns at once)."""
        if self.done:
            raise RouterError(409, "the request has finished")
        if at_token is not None and at_token > len(self.tokens):
            self.scheduled.append((at_token, target))
            return
        fut = asyncio.get_running_loop().create_future()
        await self.migrate_to.put((target, fut))
        await fut

    async def _start_migration(self, target: str | None) -> None:
        sources = [u for u in self.upstreams.values() if not u.migration]
        if not sources:
            raise RouterError(409, "request is already migrating")
        if not self.tokens:
            raise RouterError(409, "request has produced no tokens yet")
        current = {u.inst.host.name for u in sources}
        if target in current:
            raise RouterError(409, f"request already runs on {target}")
        self.migrations += 1
        self.migration_log.append({"start_token": len(self.tokens), "t": time.monotonic(), "rounds": 1})
        up = await self._open(exclude=current, host=target, migration=True)
        log.info("request %s: migrating %s -> %s at token %d", self.id, sorted(current), up.inst.host.name,
                 len(self.tokens))

    async def _maybe_handover(self) -> None:
        for dest in [u for u in self.upstreams.values() if u.migration]:
            if dest.got_output:
                behind = len(self.tokens) - dest.tokens_end
                log_entry = self.migration_log[-1] if self.migration_log else {}
                if behind > self.cfg.migration_handover_tokens and \
                        log_entry.get("rounds", 1) < self.cfg.migration_rounds:
                    # the source ran far ahead during this round's prefill (a slow first step, a busy
                    # destination): another round from the tokens so far, as ServerlessLLM repeats rounds
                    self._drop(dest)
                    log_entry["rounds"] = log_entry.get("rounds", 1) + 1
                    try:
                        await self._open(host=dest.inst.host.name, migration=True)
                    except RouterError as e:
                        log.warning("request %s: migration round failed: %s", self.id, e)
                    continue
                # the destination's KV cache is rebuilt: stop the source. What the source generated meanwhile
                # the destination regenerates (identical, checked) at decode speed: that is the stall.
                for src in [u for u in self.upstreams.values() if not u.migration]:
                    self._drop(src)
                dest.migration = False
                # what this round's recompute took on that host: the placement estimate learns from it
                dest.inst.host.observe_recompute(self.num_input_tokens + dest.start_tokens,
                                                 time.monotonic() - dest.started)
                self.handover_at.append(len(self.tokens))
                if self.migration_log:
                    self.migration_log[-1].update(handover_token=len(self.tokens), dest_token=dest.tokens_end,
                                                  warmup_s=round(time.monotonic() - self.migration_log[-1]["t"], 4))
            elif time.monotonic() - dest.started > self.cfg.migration_overlap_s:
                log.warning("request %s: destination %s produced nothing in %.0fs; migration abandoned", self.id,
                            dest.inst.host.name, self.cfg.migration_overlap_s)
                self._drop(dest)

    def info(self) -> dict:
        return {"id": self.id, "model": self.model, "tokens": len(self.tokens),
                "hosts": [u.inst.host.name for u in self.upstreams.values()], "hosts_used": self.hosts_used,
                "failovers": self.failovers, "migrations": self.migrations, "handover_at": self.handover_at,
                "max_gap_s": round(self.max_gap_s, 4),
                "migration_log": [{k: v for k, v in m.items() if k != "t"} for m in self.migration_log]}
