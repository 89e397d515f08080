"""``python -m tritonmoe.router --config hosts.json``: run the router (see docs/router.md)."""

from .cli import main

raise SystemExit(main())
