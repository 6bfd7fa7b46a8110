"""Serve the gateway with a chosen forwarding client, for bench/ab.py's side-by-side runs.

Not a product option: it swaps ``proxy_app.upstream.UpstreamPool`` before the app is imported,
so every module that takes the class from there (``from .upstream import UpstreamPool``)
builds the chosen one, then serves as ``python -m proxy_app`` does.

Usage: python bench/gateway_with_client.py --client {builtin,aiohttp} --config PATH
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", choices=("builtin", "aiohttp"), default="builtin")
    parser.add_argument("--config", required=True)
    args = parser.parse_args()

    import proxy_app
    from proxy_app import upstream

    if args.client == "aiohttp":
        sys.path.insert(0, str(Path(__file__).parent))
        import upstream_aiohttp  # bench/upstream_aiohttp.py: measured, not part of the gateway

        upstream.UpstreamPool = upstream_aiohttp.UpstreamPool  # type: ignore[misc]
    from proxy_app import app  # noqa: F401  (imported after the swap, on purpose)
    from proxy_app.__main__ import main as serve

    # Tells ab.py which code runs (the working tree or a base revision's worktree).
    print(f"gateway_with_client: client={args.client} proxy_app={proxy_app.__file__}", flush=True)
    return serve(["--config", args.config])


if __name__ == "__main__":
    sys.exit(main())
