"""Print the demo endpoint after `make demo` (or `make demo-cluster`), once a real
completion went through it.

Reads the inventory's gateway hosts (the `gateway` group; the `gpu` hosts when it has
none), their addresses on the demo network, and the generated demo key; sends one chat
completion through every gateway with the official `openai` client; then prints the lines
to export: OPENAI_BASE_URL (the first gateway), OPENAI_API_KEY, PROMETHEUS_URL (and
GRAFANA_URL when Grafana is installed), and with several hosts GATEWAY_URLS (every
gateway) and SERVING_HOSTS (every host, for `docker exec NAME systemctl ...`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from openai import OpenAI

ROOT = Path(__file__).resolve().parent.parent


def _groups(inventory: str) -> dict[str, list[str]]:
    out = subprocess.run(
        ["ansible-inventory", "-i", inventory, "--list"], check=True, capture_output=True, text=True
    ).stdout
    return {name: group.get("hosts", []) for name, group in json.loads(out).items()}


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def _address(container: str) -> str:
    fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
    out = subprocess.run(
        ["docker", "inspect", "-f", fmt, container], check=True, capture_output=True, text=True
    ).stdout.split()
    if not out:
        sys.exit(f"{container} has no address: is it running? (make demo)")
    return out[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inventory", default="inventories/local")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    groups = _groups(args.inventory)
    gateways = groups.get("gateway") or groups.get("gpu")
    if not gateways:
        sys.exit(f"no host in the gateway or gpu group of {args.inventory}")
    key = "sk-" + (ROOT / ".cache" / "demo" / "demo-key").read_text().split()[0]
    urls = [f"http://{_address(host)}:{args.port}/v1" for host in gateways]
    for host, base_url in zip(gateways, urls, strict=True):
        client = OpenAI(base_url=base_url, api_key=key, timeout=60, max_retries=0)
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, max_tokens=8, messages=[{"role": "user", "content": "Hello!"}]
        )
        print(
            f"# {host}: {model} answered with {reply.usage.completion_tokens} tokens",
            file=sys.stderr,
        )
    print(f"OPENAI_BASE_URL={urls[0]}")
    if len(urls) > 1 or groups.get("gateway"):
        print(f"GATEWAY_URLS={','.join(urls)}")
    print(f"OPENAI_API_KEY={key}")
    for monitoring_host in groups.get("monitoring", [])[:1]:
        address = _address(monitoring_host)
        prometheus = f"http://{address}:9090"
        if _answers(f"{prometheus}/-/ready"):
            print(f"PROMETHEUS_URL={prometheus}")
        grafana = f"http://{address}:3000"
        if _answers(f"{grafana}/api/health"):
            print(f"GRAFANA_URL={grafana}")
        else:
            print(
                "# Grafana: not installed on this host (grafana_install_source: none)",
                file=sys.stderr,
            )
    everyone = sorted({h for hosts in groups.values() for h in hosts})
    if len(everyone) > 1:
        print(f"SERVING_HOSTS={','.join(everyone)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
