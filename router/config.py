"""The router's hosts file (JSON, or TOML through tomllib) and its validation.

    {
      "listen": {"host": "127.0.0.1", "port": 8080},
      "token_file": "/etc/tritonmoe/router.token",          # optional: clients and admin send Bearer <token>
      "policy": "locality",                                 # locality | random | round_robin
      "hosts": [
        {"name": "h0", "http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001", "metrics": "http://127.0.0.1:8002/metrics",
         "loader": "http://127.0.0.1:8073", "max_models": 4,
         "device": "gpu:0",                                 # cpu (default) | gpu | gpu:N: the instance's device
         "bandwidth": {"dram": 3e10, "disk": 2e9},          # optional priors (bytes/s) of the start-up estimate
         "engine_pool": "/run/tritonmoe/pool.sock"}         # optional: the host's warm engine pool (its socket)
      ],
      "placement_migration": false,                        # locality: migrate running streams to free a better host
      "models": {
        "mixtral": {"checkpoint": "/models/mixtral", "parameters": {"max_num_seqs": "8"},
                    "min_instances": 0, "max_instances": 2, "target_concurrency": 4, "keep_alive_s": 60,
                    "use_engine_pool": true}                # false: this model's stubs run the engine themselves
      }
    }

Names become Triton model names and URL path parts, so they are restricted to a safe alphabet with no ``/`` and
no ``..``; checkpoints must be absolute paths (or a name registered at the host's loader), never relative ones
that a server would resolve against its own folders.

The warm engine pool is per host (one ``tritonmoe-engine-pool`` daemon per machine, docs/loader.md): a host's
``engine_pool`` is added as the ``engine_pool`` parameter of every model the router loads there (unless the model
says ``"use_engine_pool": false``). A model's own ``parameters.engine_pool`` is refused: the stub connects to that
socket and sends it the server's environment, so like ``loader_url`` it is the router's (the operator's) to set,
per host, never a deploy request's.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PARAM_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
ADDR_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$")
DEVICE_RE = re.compile(r"^(cpu|gpu(:[0-9]{1,3})?)$")
SUN_PATH_MAX = 107  # bytes of a Unix socket path (Linux sun_path is 108 with the NUL; the pool refuses longer)
POLICIES = ("locality", "random", "round_robin")
# Parameters that decide what code or files the server touches are set by the router, never by a deploy request.
RESERVED_PARAMS = {"checkpoint", "loader_url", "eamc_path", "engine_pool"}


class ConfigError(ValueError):
    """The hosts file or a deploy request is invalid; the message names the field."""


def check_name(name, what: str = "model name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise ConfigError(f"invalid {what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                          "letter or digit, no '..'")
    return name


def check_engine_pool(path, what: str = "engine_pool") -> str:
    """A warm engine pool's socket: an absolute path (the servers' stubs connect to it as given), no '..'."""
    if not isinstance(path, str) or not path.startswith("/") or ".." in Path(path).parts or "\0" in path:
        raise ConfigError(f"{what} must be the absolute path of the host's engine pool socket "
                          f"(tritonmoe-engine-pool --socket PATH), got {path!r}")
    if len(path.encode()) > SUN_PATH_MAX:
        raise ConfigError(f"{what} is longer than {SUN_PATH_MAX} bytes (a Unix socket path's limit): {path!r}")
    return path


@dataclass
class HostConfig:
    name: str
    http: str   # host:port of Triton's HTTP endpoint
    grpc: str   # host:port of Triton's gRPC endpoint
    metrics: str | None = None  # full URL of Triton's Prometheus endpoint
    loader: str | None = None   # URL of the host's loader service (tier lookup); none: every checkpoint is "disk"
    max_models: int = 4         # models resident at once (GPU memory, in models); LRU idle ones make room
    device: str = "cpu"         # where this server runs instances: cpu | gpu | gpu:N (KIND_GPU, device N)
    bandwidth: dict[str, float] = field(default_factory=dict)  # priors of the tiers' load bandwidths (bytes/s)
    engine_pool: str | None = None  # socket of the host's warm engine pool: set as every loaded model's engine_pool

    @property
    def instance_group(self) -> dict:
        """Triton's instance_group entry for models loaded on this server."""
        if self.device == "cpu":
            return {"count": 1, "kind": "KIND_CPU"}
        gpu = int(self.device.partition(":")[2] or 0)
        return {"count": 1, "kind": "KIND_GPU", "gpus": [gpu]}

    @property
    def pool_device(self) -> str:
        """The engine pool's name for this server's device: ``cpu``, or ``cuda:N`` (a ``KIND_GPU`` instance on GPU
        N claims a worker of ``cuda:N``; plain ``gpu`` is GPU 0, as in :attr:`instance_group`)."""
        if self.device == "cpu":
            return "cpu"
        return f"cuda:{int(self.device.partition(':')[2] or 0)}"

    @classmethod
    def parse(cls, doc: dict, i: int) -> "HostConfig":
        if not isinstance(doc, dict):
            raise ConfigError(f"hosts[{i}] must be an object")
        unknown = set(doc) - {"name", "http", "grpc", "metrics", "loader", "max_models", "device", "bandwidth",
                              "engine_pool"}
        if unknown:
            raise ConfigError(f"hosts[{i}]: unknown key(s) {sorted(unknown)}")
        name = check_name(doc.get("name", f"host{i}"), "host name")
        for key in ("http", "grpc"):
            if not isinstance(doc.get(key), str) or not ADDR_RE.match(doc[key]):
                raise ConfigError(f"hosts[{i}].{key} must be 'host:port', got {doc.get(key)!r}")
        for key in ("metrics", "loader"):
            if doc.get(key) is not None and not (isinstance(doc[key], str) and doc[key].startswith("http")):
                raise ConfigError(f"hosts[{i}].{key} must be an http(s) URL, got {doc[key]!r}")
        max_models = doc.get("max_models", 4)
        if not isinstance(max_models, int) or max_models < 1:
            raise ConfigError(f"hosts[{i}].max_models must be an integer >= 1")
        device = doc.get("device", "cpu")
        if not isinstance(device, str) or not DEVICE_RE.match(device):
            raise ConfigError(f"hosts[{i}].device must be 'cpu', 'gpu' or 'gpu:N', got {device!r}")
        bandwidth = doc.get("bandwidth", {}) or {}
        if not isinstance(bandwidth, dict) or any(
                k not in ("dram", "disk", "remote") or isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0
                for k, v in bandwidth.items()):
            raise ConfigError(f"hosts[{i}].bandwidth must map dram/disk/remote to bytes per second > 0")
        pool = doc.get("engine_pool")
        if pool is not None:
            check_engine_pool(pool, f"hosts[{i}].engine_pool")
        return cls(name, doc["http"], doc["grpc"], doc.get("metrics"), doc.get("loader"), max_models, device,
                   {k: float(v) for k, v in bandwidth.items()}, pool)


@dataclass
class ModelSpec:
    """A deployed model: what to load, not a running instance."""
    name: str
    checkpoint: str
    parameters: dict[str, str] = field(default_factory=dict)
    min_instances: int = 0
    max_instances: int = 1
    target_concurrency: int = 4  # in-flight requests per instance before another instance starts
    keep_alive_s: float = 60.0   # an idle instance unloads after this (scale to zero)
    use_loader: bool = False     # load through the host's loader (converted checkpoints)
    use_engine_pool: bool = True  # run in the host's warm engine pool when the host has one (hosts[].engine_pool)

    @classmethod
    def parse(cls, name: str, doc: dict) -> "ModelSpec":
        check_name(name)
        if not isinstance(doc, dict):
            raise ConfigError(f"models.{name} must be an object")
        unknown = set(doc) - {"checkpoint", "parameters", "min_instances", "max_instances", "target_concurrency",
                              "keep_alive_s", "use_loader", "use_engine_pool"}
        if unknown:
            raise ConfigError(f"models.{name}: unknown key(s) {sorted(unknown)}")
        ckpt = doc.get("checkpoint")
        if not isinstance(ckpt, str) or not ckpt:
            raise ConfigError(f"models.{name}.checkpoint is required (an absolute path or a loader model name)")
        if not Path(ckpt).is_absolute() and not NAME_RE.match(ckpt):
            raise ConfigError(f"models.{name}.checkpoint must be an absolute path or a loader model name, got {ckpt!r}")
        if ".." in Path(ckpt).parts:
            raise ConfigError(f"models.{name}.checkpoint must not contain '..'")
        params = doc.get("parameters", {}) or {}
        if not isinstance(params, dict):
            raise ConfigError(f"models.{name}.parameters must be an object")
        clean = {}
        for k, v in params.items():
            if k == "engine_pool":
                raise ConfigError(f"models.{name}.parameters: 'engine_pool' is set per host by the router "
                                  "(hosts[].engine_pool, the socket of that host's pool), not per model; "
                                  "\"use_engine_pool\": false keeps a model out of the pools")
            if not PARAM_KEY_RE.match(str(k)) or k in RESERVED_PARAMS:
                raise ConfigError(f"models.{name}.parameters: key {k!r} is not allowed")
            if not isinstance(v, (str, int, float, bool)):
                raise ConfigError(f"models.{name}.parameters.{k} must be a string, number or boolean")
            clean[k] = str(v).lower() if isinstance(v, bool) else str(v)
        spec = cls(name, ckpt, clean)
        for key, typ, lo in (("min_instances", int, 0), ("max_instances", int, 1), ("target_concurrency", int, 1),
                             ("keep_alive_s", (int, float), 0)):
            if key in doc:
                v = doc[key]
                if not isinstance(v, typ) or isinstance(v, bool) or v < lo:
                    raise ConfigError(f"models.{name}.{key} must be a number >= {lo}, got {v!r}")
                setattr(spec, key, v)
        if spec.min_instances > spec.max_instances:
            raise ConfigError(f"models.{name}: min_instances > max_instances")
        spec.use_loader = bool(doc.get("use_loader", False))
        if not isinstance(doc.get("use_engine_pool", True), bool):
            raise ConfigError(f"models.{name}.use_engine_pool must be true or false")
        spec.use_engine_pool = doc.get("use_engine_pool", True)
        return spec


@dataclass
class RouterConfig:
    hosts: list[HostConfig]
    models: dict[str, ModelSpec] = field(default_factory=dict)
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    token: str | None = None
    policy: str = "locality"
    poll_interval_s: float = 1.0
    first_token_timeout_s: float = 60.0   # includes a cold start's queueing on the server, not the load itself
    token_timeout_s: float = 10.0         # a stream silent this long is treated as a hung server
    load_timeout_s: float = 300.0
    load_failure_backoff_s: float = 30.0  # a failed load is not retried for this long: the error is returned
    max_failovers: int = 3
    probe_interval_s: float = 30.0        # idle instances get a one-token probe this often (dead stubs)
    migration_overlap_s: float = 10.0     # a migration destination silent this long is abandoned
    migration_handover_tokens: int = 8    # hand over when the destination is at most this far behind...
    migration_rounds: int = 3             # ...or after this many recompute rounds
    seed_sampled: bool = True             # give unseeded sampled requests a seed so they stay migratable
    placement_migration: bool = False     # locality: migrate running streams off the best host to start there

    @classmethod
    def parse(cls, doc: dict, base_dir: Path | None = None) -> "RouterConfig":
        if not isinstance(doc, dict):
            raise ConfigError("the config must be an object")
        hosts_doc = doc.get("hosts")
        if not isinstance(hosts_doc, list) or not hosts_doc:
            raise ConfigError("'hosts' must be a non-empty list")
        hosts = [HostConfig.parse(h, i) for i, h in enumerate(hosts_doc)]
        if len({h.name for h in hosts}) != len(hosts):
            raise ConfigError("host names must be unique")
        models = {n: ModelSpec.parse(n, m) for n, m in (doc.get("models") or {}).items()}
        cfg = cls(hosts, models)
        listen = doc.get("listen", {}) or {}
        cfg.listen_host = listen.get("host", cfg.listen_host)
        cfg.listen_port = int(listen.get("port", cfg.listen_port))
        token_file = doc.get("token_file")
        if token_file:
            path = Path(token_file) if Path(token_file).is_absolute() or base_dir is None else base_dir / token_file
            cfg.token = path.read_text().strip() or None
        cfg.policy = doc.get("policy", cfg.policy)
        if cfg.policy not in POLICIES:
            raise ConfigError(f"'policy' must be one of {POLICIES}, got {cfg.policy!r}")
        for key in ("poll_interval_s", "first_token_timeout_s", "token_timeout_s", "load_timeout_s",
                    "load_failure_backoff_s", "migration_overlap_s", "probe_interval_s"):
            if key in doc:
                v = doc[key]
                if not isinstance(v, (int, float)) or v <= 0:
                    raise ConfigError(f"'{key}' must be a number > 0")
                setattr(cfg, key, float(v))
        for key in ("max_failovers", "migration_handover_tokens", "migration_rounds"):
            if key in doc:
                if not isinstance(doc[key], int) or doc[key] < 0:
                    raise ConfigError(f"'{key}' must be an integer >= 0")
                setattr(cfg, key, doc[key])
        for key in ("seed_sampled", "placement_migration"):
            if key in doc:
                if not isinstance(doc[key], bool):
                    raise ConfigError(f"'{key}' must be true or false")
                setattr(cfg, key, doc[key])
        return cfg


def load_config(path: str | Path) -> RouterConfig:
    path = Path(path)
    text = path.read_bytes()
    try:
        doc = tomllib.loads(text.decode()) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    return RouterConfig.parse(doc, path.parent)
