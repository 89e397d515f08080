"""Placement policies: which host serves a request for a model.

A policy sees every healthy host that could serve the model and returns one; the lifecycle manager then uses the
instance there or loads the model there first (a cold start). ``locality`` (ServerlessLLM) picks the lowest
estimated start-up: queue wait + checkpoint bytes / bandwidth of the tier holding it (0 when loaded), with
bandwidths measured per host, + on a host with a warm engine pool, the wait for a worker when none is warm for the
host's device after the router's own pending cold starts there (``Manager.pool_wait_s``). ``random`` and
``round_robin`` are the baselines: they ignore where the model is (plain Triton loading wherever they land), as a
load balancer without model locality would.

With ``placement_migration`` (locality only; the manager's ``_plan_migration``), a host that is full of busy
models is a candidate too: its start-up is the cost of migrating the running streams elsewhere (the destination's
start-up + recomputing each stream's tokens there) + loading the model from that host's tier, compared with the
policy's cold start on a free host (``MigrationPlan``, ``Move``) -- and with waiting for that host's streams to end
(each stream's remaining tokens at its observed token rate), whichever is soonest.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from .config import ModelSpec
from .state import Host, Instance


@dataclass
class Candidate:
    host: Host
    tier: str           # gpu (loaded) | dram | disk | remote
    load_s: float       # estimated load time (0 when loaded)
    queue_s: float      # estimated wait behind work already on the host
    inflight: int       # requests of this model in flight there
    pool_wait_s: float = 0.0  # of load_s: the wait for a warm engine-pool worker (none free on the host's device)

    @property
    def startup_s(self) -> float:
        return self.load_s + self.queue_s


@dataclass
class Move:
    """Running streams of one busy instance, moved to free its place (placement-driven migration)."""
    inst: Instance      # the busy instance (its host is the one being freed)
    dest: Candidate     # where its model carries on: a warm instance, or a cold start there
    sessions: list      # the StreamSessions running on it
    tokens: int         # prompt + generated tokens of the longest stream (what the destination recomputes)
    cost_s: float       # destination's start-up + estimated recompute of the longest stream


@dataclass
class MigrationPlan:
    """Start a model on ``host`` (the best locality) after migrating ``moves`` away (ServerlessLLM section 5), or
    after waiting ``wait_s`` for enough of its running streams to end (ServerlessLLM's other option)."""
    host: Host
    tier: str           # where the model's checkpoint is on ``host``
    load_s: float       # estimated load there (with the host's load queue)
    moves: list[Move]   # empty: the streams there cannot all move, only waiting is possible
    wait_s: float | None = None  # until enough instances there are idle (their streams' estimated ends); None: unknown

    @property
    def migration_s(self) -> float:
        return max(m.cost_s for m in self.moves) if self.moves else float("inf")  # the moves run in parallel

    @property
    def total_s(self) -> float:
        return self.migration_s + self.load_s

    @property
    def wait_total_s(self) -> float:
        return float("inf") if self.wait_s is None else self.wait_s + self.load_s

    @property
    def best_s(self) -> float:
        return min(self.total_s, self.wait_total_s)


class Policy:
    name = "base"

    def choose(self, spec: ModelSpec, candidates: list[Candidate], loaded: int) -> Candidate:
        raise NotImplementedError


class LocalityPolicy(Policy):
    """Lowest estimated start-up. A loaded instance below its target concurrency always wins; once instances
    are saturated, a cold start elsewhere competes with queueing (bounded by max_instances)."""

    name = "locality"

    def choose(self, spec, candidates, loaded):
        warm = [c for c in candidates if c.tier == "gpu"]
        free = [c for c in warm if c.inflight < spec.target_concurrency]
        if free:
            return min(free, key=lambda c: (c.inflight, c.queue_s))
        loading = [c for c in candidates if c.tier == "loading"]
        if loading and not warm:
            # join the cold start in progress rather than start another (a burst would otherwise load the
            # model on every host at once, and a load that fails would fail once per host)
            return min(loading, key=lambda c: c.startup_s)
        cold = [c for c in candidates if c.tier != "gpu"]
        if warm and (loaded >= spec.max_instances or not cold):
            return min(warm, key=lambda c: (c.startup_s, c.inflight))
        return min(candidates, key=lambda c: (c.startup_s, c.inflight))


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, seed: int | None = None):
        self.rng = random.Random(seed)

    def choose(self, spec, candidates, loaded):
        return self.rng.choice(candidates)


class RoundRobinPolicy(Policy):
    name = "round_robin"

    def __init__(self):
        self.counter = itertools.count()

    def choose(self, spec, candidates, loaded):
        ordered = sorted(candidates, key=lambda c: c.host.name)
        return ordered[next(self.counter) % len(ordered)]


def make_policy(name: str, seed: int | None = None) -> Policy:
    if name == "locality":
        return LocalityPolicy()
    if name == "random":
        return RandomPolicy(seed)
    if name == "round_robin":
        return RoundRobinPolicy()
    raise ValueError(f"unknown policy {name!r}")
