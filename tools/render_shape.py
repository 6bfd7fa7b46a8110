#!/usr/bin/env python3
"""Render what the roles make of an inventory's shape, host by host, to compare two checkouts:

    python tools/render_shape.py OUT [--repo CHECKOUT] [INVENTORY ...]
    diff -r -x _work before/ after/

For every host of each inventory (default: inventories/local, local-cluster and example, and
tests/roles/variations, a layout with every variation), the variables each role derives from
the cluster's shape (roles/common/filter_plugins/topology.py): vLLM's instances, unit and
firewall, the gateway's config, nginx's upstreams, Redis' clients, Prometheus' targets and its
whole prometheus.yml, and the rolling update's gateways and drain targets; as JSON files under
OUT/<inventory>/<host>.<role>.json. The roles are those of --repo (default: this checkout), so
one copy of this tool renders an older checkout too.

No host is contacted: each is given a made-up default IPv4 address (10.9.0.<n>, its place in
the inventory) where its facts would be; the demo inventories' generated secrets go to one
directory under the system's temporary directory, the same for every run, so that two runs
render the same secrets.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent.parent
INVENTORIES = [
    "inventories/local",
    "inventories/local-cluster",
    "inventories/example",
    "tests/roles/variations",
]
# What each role derives from the shape.
VARIABLES = {
    "vllm": [
        "vllm_host",
        "__vllm_instances",
        "__vllm_unit",
        "__vllm_peers",
        "__vllm_firewall_hosts",
        "__vllm_firewall_allow",
        "__vllm_firewall_ports",
    ],
    "llm_proxy": [
        "__llm_proxy_config",
        "__llm_proxy_standby_config",
        "__llm_proxy_units",
        "__llm_proxy_standby",
    ],
    "nginx": [
        "__nginx_upstream",
        "__nginx_standby_upstream",
        "__nginx_vllm_upstream",
        "__nginx_vllm_metrics",
    ],
    "redis": ["__redis_gateway_hosts", "__redis_client_hosts", "__redis_default_listen_address"],
    "prometheus": [
        "__prometheus_gateway_hosts",
        "__prometheus_standby_hosts",
        "__prometheus_vllm_targets",
        "__prometheus_redis_targets",
    ],
}
SECRETS = Path(tempfile.gettempdir()) / "llmhost-render-shape"
# The one beside this Python (a virtualenv's), else the PATH's.
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook", path=str(Path(sys.executable).parent)) or (
    "ansible-playbook"
)


def _expression(name: str) -> str:
    return "{{ " + name + " }}"


def _write(variables: dict[str, str], dest: str) -> dict:
    return {
        "name": f"Render to {dest}",
        "ansible.builtin.copy": {"content": "{{ __rendered | to_nice_json }}", "dest": dest},
        "delegate_to": "localhost",
        "vars": {"__rendered": variables},
    }


def playbook(repo: Path, work: Path, out: Path) -> Path:
    """Copy the roles, add a task file to each that writes its variables out, and write the
    playbook that runs them and the rolling update's variables (its second play's, evaluated
    where the roll evaluates them: before any role of the play runs)."""
    shutil.copytree(repo / "roles", work / "roles")
    for role, names in VARIABLES.items():
        rendered = {n: _expression(n) for n in names}
        if role == "prometheus":
            rendered["prometheus.yml"] = (
                "{{ lookup('ansible.builtin.template', 'prometheus.yml.j2') }}"
            )
        task = _write(rendered, f"{out}/{{{{ inventory_hostname }}}}.{role}.json")
        (work / "roles" / role / "tasks" / "_render_shape.yml").write_text(yaml.safe_dump([task]))
    roll = yaml.safe_load((repo / "playbooks/rolling-update.yml").read_text())[1]
    find = next(t for t in roll["pre_tasks"] if t["name"] == "Find this host's backends")
    roll_vars = {**roll["vars"], **find.get("vars", {})}
    # Not the admin key (a secret) nor the whole shape (its parts are what the roll uses).
    wanted = [n for n in roll_vars if n not in ("__roll_admin_key", "__roll_topology")]
    address = "10.9.0.{{ groups['all'].index(inventory_hostname) + 1 }}"
    plays = [
        {
            "name": "Stand in for facts",
            "hosts": "all",
            "gather_facts": False,
            "tasks": [
                {
                    "ansible.builtin.set_fact": {
                        "ansible_default_ipv4": {"address": address, "interface": "eth0"}
                    }
                }
            ],
        },
        {
            "name": "The roles' variables",
            "hosts": "all",
            "gather_facts": False,
            "tasks": [
                {"ansible.builtin.include_role": {"name": r, "tasks_from": "_render_shape.yml"}}
                for r in VARIABLES
            ],
        },
        {
            "name": "The rolling update's variables",
            "hosts": "gpu",
            "gather_facts": False,
            "roles": roll.get("roles", []),
            "vars": roll_vars,
            "pre_tasks": [
                _write(
                    {n: _expression(n) for n in wanted},
                    f"{out}/{{{{ inventory_hostname }}}}.roll.json",
                )
            ],
        },
    ]
    path = work / "render_shape.yml"
    path.write_text(yaml.safe_dump(plays, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("inventories", nargs="*", default=INVENTORIES)
    parser.add_argument("--repo", type=Path, default=HERE)
    args = parser.parse_args(argv)
    repo, out = args.repo.resolve(), args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    work = out / "_work"
    work.mkdir(parents=True)
    (SECRETS / "demo").mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        LLMHOST_CACHE_DIR=str(SECRETS),
        ANSIBLE_CONFIG=str(repo / "ansible.cfg"),
        ANSIBLE_ROLES_PATH=str(work / "roles"),
    )
    failed = 0
    for inventory in args.inventories:
        where = out / Path(inventory).name
        where.mkdir()
        book = playbook(repo, work / where.name, where)
        command = [ANSIBLE_PLAYBOOK, "-i", str(repo / inventory), "-c", "local", str(book)]
        run = subprocess.run(
            [*command, "-e", "ansible_connection=local"], env=env, capture_output=True, text=True
        )
        if run.returncode != 0:
            failed += 1
            print(f"{inventory}: ansible-playbook failed\n{run.stdout[-3000:]}{run.stderr[-3000:]}")
        else:
            print(f"{inventory}: {len(list(where.glob('*.json')))} files in {where}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
