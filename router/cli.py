"""Command line of the router.

    python -m tritonmoe.router --config hosts.json [--host 127.0.0.1] [--port 8080] [--policy locality]
                               [--token-file FILE] [--log-level info]

The config file (JSON, or TOML when it ends in .toml) lists the hosts and the deployed models; flags override its
``listen``, ``policy`` and ``token_file`` entries. ``$TRITONMOE_ROUTER_TOKEN`` sets the token too.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from aiohttp import web

from .config import POLICIES, ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tritonmoe.router", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="hosts file (JSON or TOML)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="port to listen on (default 8080)")
    p.add_argument("--policy", choices=POLICIES, help="placement policy")
    p.add_argument("--token-file", help="bearer token clients and the management API must send")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config)
    except (ConfigError, OSError) as e:
        p.error(str(e))
    if args.host:
        cfg.listen_host = args.host
    if args.port:
        cfg.listen_port = args.port
    if args.policy:
        cfg.policy = args.policy
    if args.token_file:
        cfg.token = Path(args.token_file).read_text().strip() or None
    elif os.environ.get("TRITONMOE_ROUTER_TOKEN"):
        cfg.token = os.environ["TRITONMOE_ROUTER_TOKEN"]
    from .app import Router

    router = Router(cfg)
    logging.getLogger("tritonmoe.router").info("router on http://%s:%d, %d hosts, policy %s%s", cfg.listen_host,
                                               cfg.listen_port, len(cfg.hosts), cfg.policy,
                                               ", token required" if cfg.token else "")
    web.run_app(router.app(), host=cfg.listen_host, port=cfg.listen_port, print=None)
    return 0
