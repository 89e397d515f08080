"""Command line of the router.

    python -m tritonmoe.router --config hosts.json [--host 127.0.0.1] [--port 8080] [--policy locality]
                               [--placement-migration] [--token-file FILE] [--log-level info]
    python -m tritonmoe.router --local-servers 3 --deploy NAME=/abs/checkpoint [--deploy ...] [--keep-alive 60]
                               [--engine-pool /run/tritonmoe/pool.sock]

The config file (JSON, or TOML when it ends in .toml) lists the hosts and the deployed models; flags override its
``listen``, ``policy`` and ``token_file`` entries. ``$TRITONMOE_ROUTER_TOKEN`` sets the token too.
``--local-servers N`` is the single-machine multi-server mode: it starts N tritonservers on loopback (empty model
repositories, explicit model control; the router sends model code and config with each load), adds them as hosts,
and stops them when the router exits. ``--deploy`` registers models (nothing loads until the first request).
``--engine-pool SOCKET`` sets the local servers' ``engine_pool`` (a running ``tritonmoe-engine-pool --socket SOCKET``
on this machine): the models the router loads there run in its warm workers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import sysconfig
import tempfile
from pathlib import Path

from aiohttp import web

from .config import POLICIES, ConfigError, HostConfig, ModelSpec, RouterConfig, check_engine_pool, load_config

log = logging.getLogger("tritonmoe.router")


def start_local_servers(n: int) -> list:
    from tritonmoe.tools.tritonserver import TritonServer

    sysconfig.get_config_vars()  # lazily filled and not thread-safe: fill it before the parallel starts
    root = Path(tempfile.mkdtemp(prefix="tritonmoe-router-"))
    servers = []
    for i in range(n):
        (root / f"repo{i}").mkdir()
        servers.append(TritonServer(root / f"repo{i}", log_path=root / f"server{i}.log",
                                   extra_args=["--disable-auto-complete-config"]))
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(s.start, 180) for s in servers]
        errors = [f.exception() for f in futures]
    if any(errors):
        for s in servers:
            s.stop()
        raise RuntimeError(f"a local tritonserver did not start: {next(e for e in errors if e)}")
    for i, s in enumerate(servers):
        log.info("local tritonserver h%d: gRPC %s, HTTP %s, log %s", i, s.grpc_url, s.http_url, s.log_path)
    return servers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tritonmoe.router", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="hosts file (JSON or TOML)")
    p.add_argument("--local-servers", type=int, default=0, metavar="N",
                   help="start N tritonservers on loopback and route over them")
    p.add_argument("--deploy", action="append", default=[], metavar="NAME=CHECKPOINT",
                   help="deploy a model (absolute checkpoint path); repeatable")
    p.add_argument("--keep-alive", type=float, help="keep-alive seconds of --deploy models (default 60)")
    p.add_argument("--engine-pool", metavar="SOCKET",
                   help="--local-servers: this machine's warm engine pool (tritonmoe-engine-pool --socket SOCKET); "
                        "models loaded on the local servers run in its workers")
    p.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="port to listen on (default 8080)")
    p.add_argument("--policy", choices=POLICIES, help="placement policy")
    p.add_argument("--placement-migration", action="store_true", default=None,
                   help="locality: when the host with the best locality for a model that must start is busy with "
                        "another model's streams, migrate them away if that starts the model sooner than a free "
                        "host would (the hosts file's placement_migration)")
    p.add_argument("--token-file", help="bearer token clients and the management API must send")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.config and not args.local_servers:
        p.error("give --config, --local-servers N, or both")
    try:
        if args.engine_pool is not None:
            if not args.local_servers:
                raise ConfigError("--engine-pool is for --local-servers; a hosts file sets hosts[].engine_pool")
            check_engine_pool(args.engine_pool, "--engine-pool")
        cfg = load_config(args.config) if args.config else None
        for item in args.deploy:
            name, sep, ckpt = item.partition("=")
            if not sep:
                raise ConfigError(f"--deploy takes NAME=CHECKPOINT, got {item!r}")
            doc = {"checkpoint": str(Path(ckpt).expanduser().resolve()) if os.sep in ckpt else ckpt}
            if args.keep_alive is not None:
                doc["keep_alive_s"] = args.keep_alive
            spec = ModelSpec.parse(name, doc)
            if cfg is not None:
                cfg.models[name] = spec
            else:
                args._specs = getattr(args, "_specs", {}) | {name: spec}
    except (ConfigError, OSError) as e:
        p.error(str(e))
    servers = start_local_servers(args.local_servers) if args.local_servers else []
    try:
        local = [HostConfig(f"h{i}", s.http_url, s.grpc_url, s.metrics_url, engine_pool=args.engine_pool)
                 for i, s in enumerate(servers)]
        if cfg is None:
            cfg = RouterConfig(local, getattr(args, "_specs", {}))
        else:
            cfg.hosts += local
        if args.host:
            cfg.listen_host = args.host
        if args.port:
            cfg.listen_port = args.port
        if args.policy:
            cfg.policy = args.policy
        if args.placement_migration:
            cfg.placement_migration = True
        if args.token_file:
            cfg.token = Path(args.token_file).read_text().strip() or None
        elif os.environ.get("TRITONMOE_ROUTER_TOKEN"):
            cfg.token = os.environ["TRITONMOE_ROUTER_TOKEN"]
        from .app import Router

        router = Router(cfg)
        log.info("router on http://%s:%d, %d hosts, policy %s%s, models %s%s", cfg.listen_host, cfg.listen_port,
                 len(cfg.hosts), cfg.policy, " with placement migration" if cfg.placement_migration else "",
                 sorted(cfg.models), ", token required" if cfg.token else "")
        web.run_app(router.app(), host=cfg.listen_host, port=cfg.listen_port, print=None)
    finally:
        for s in servers:
            s.stop()
    return 0
