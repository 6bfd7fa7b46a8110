"""How a model reaches the gpu hosts, by source: `ansible.builtin.copy` (the vllm role's `sync`
before it moved to rsync), rsync (`ansible.posix.synchronize`, the role's `sync` now) and the
mirror (`vllm_model_source: mirror`, roles/model_mirror + llmhost-model), on `make
demo-cluster`'s two gpu hosts.

Not a test: a measurement. A synthetic model (tools/make_synthetic_model.py: random bytes in
1 GiB shards plus the small json files) goes to both gpu hosts at once, as a play does, by each
source in turn: the first transfer into an empty directory, then the same step again with
nothing to change (a re-run of site.yml). Each time is the task's own, from Ansible's JSON
results (both hosts in parallel, as in a real run), the page cache dropped before each; the
mirror's fetch also by each host's own clock. The mirror's intake (the model copied onto it
and its SHA256SUMS written) is timed apart: it happens once per model, not once per host.
Results: bench/model_transfer.json; the figure in docs/operating.md is rendered from it.

    .venv/bin/python bench/model_transfer.py [--gib 4]     # about 5 minutes for 4 GiB

Needs `make demo-cluster` up (its mirror on the redis host) and root (to drop the page cache).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import yaml
from demo_hosts import REPO, address, groups, this_run

RESULTS = REPO / "bench" / "model_transfer.json"
BENCH_DIR = "/var/lib/llmhost-bench"  # on the gpu hosts
NAME = "bench-synthetic"  # on the mirror
SOURCES = ("copy", "rsync", "mirror")
# What the projection scales to (the site: an 80B MoE to six gpu hosts).
PROJECT_BYTES, PROJECT_HOSTS = 160 * 10**9, 6

# The key path of the test inventories is relative to the repository (ansible.cfg's home).
_KEY = (
    "{{ ansible_ssh_private_key_file | realpath"
    " if ansible_ssh_private_key_file is defined else omit }}"
)


def _synchronize(src: str, dest: str, extra: list[str]) -> dict:
    return {
        "ansible.posix.synchronize": {
            "src": src.rstrip("/") + "/",
            "dest": dest + "/",
            "archive": True,
            "owner": False,
            "group": False,
            "compress": False,
            "use_ssh_args": True,
            "private_key": _KEY,
            "rsync_opts": extra,
        }
    }


def _play(hosts: str, name: str, task: dict) -> list[dict]:
    return [
        {
            "hosts": hosts,
            "gather_facts": False,
            "become": True,
            "tasks": [{"name": name, **task}],
        }
    ]


def _run(inventory: str, play: list[dict]) -> tuple[float, dict]:
    """Run ``play``; the seconds of its one task (start to end over all hosts) and its
    hosts' results."""
    with tempfile.NamedTemporaryFile("w", suffix=".yml", dir=REPO, delete=False) as f:
        yaml.safe_dump(play, f)
    try:
        run = subprocess.run(
            ["ansible-playbook", "-i", inventory, f.name],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=dict(os.environ, ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json"),
            check=False,
        )
    finally:
        os.unlink(f.name)
    if run.returncode != 0:
        sys.exit(f"{play[0]['tasks'][0]['name']} failed:\n{run.stdout[-3000:]}{run.stderr[-2000:]}")
    task = json.loads(run.stdout)["plays"][0]["tasks"][0]
    start, end = (datetime.fromisoformat(task["task"]["duration"][k]) for k in ("start", "end"))
    return (end - start).total_seconds(), task["hosts"]


def _drop_caches() -> None:
    """The page cache of the machine (the test hosts share its kernel): each timed step reads
    the model from disk, as a real re-run days later would."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _clean(inventory: str, mirror_host: str) -> None:
    """Remove what the benchmark put on the gpu hosts and on the mirror."""
    absent = {"state": "absent"}
    gone = {"ansible.builtin.file": {"path": BENCH_DIR, **absent}}
    _run(inventory, _play("gpu", "Empty the bench directory", gone))
    gone = {"ansible.builtin.file": {"path": f"/srv/llmhost-models/{NAME}", **absent}}
    _run(inventory, _play(mirror_host, "Empty the mirror's copy", gone))


def _steps(source: str, model: Path, mirror: str) -> dict:
    dest = f"{BENCH_DIR}/{source}"
    if source == "copy":
        return {
            "ansible.builtin.copy": {
                "src": str(model) + "/",
                "dest": dest + "/",
                "mode": "u=rwX,g=rX,o=",
                "directory_mode": "0750",
            }
        }
    if source == "rsync":
        return _synchronize(str(model), dest, ["--chmod=D0750,F0640"])
    return {
        "ansible.builtin.command": {
            "argv": [
                "/usr/local/bin/llmhost-model", "fetch", "--url",
                f"http://{mirror}:8090/{NAME}", "--dest", dest, "--margin", "0",
            ]
        },
        "register": "fetched",
        "changed_when": "(fetched.stdout | from_json).changed",
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inventory", default="inventories/local-cluster")
    parser.add_argument("--gib", type=float, default=4.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: each step starts with the page cache dropped")
    hosts = groups(args.inventory)
    gpu, mirror_host = hosts["gpu"], hosts.get("model_mirror", [None])[0]
    if mirror_host is None:
        sys.exit(f"{args.inventory} has no model_mirror host")
    model = REPO / ".cache" / "bench-model" / f"{args.gib:g}gib"
    maker = REPO / "tools" / "make_synthetic_model.py"
    subprocess.run([sys.executable, str(maker), str(model), "--gib", str(args.gib)], check=True)
    size = sum(f.stat().st_size for f in model.iterdir())
    files = len(list(model.iterdir()))

    # rsync on the gpu hosts (the vllm role installs it for `sync` only), a clean slate, then
    # the mirror's intake (once per model).
    _run(args.inventory, _play("gpu", "Install rsync", {"ansible.builtin.apt": {"name": "rsync"}}))
    _clean(args.inventory, mirror_host)
    _drop_caches()
    intake_copy, _ = _run(
        args.inventory,
        _play(
            mirror_host,
            "Model onto the mirror",
            _synchronize(
                str(model),
                f"/srv/llmhost-models/{NAME}",
                ["--chmod=D0755,F0644", "--omit-dir-times"],
            ),
        ),
    )
    intake_sums, _ = _run(
        args.inventory,
        _play(
            mirror_host,
            "Its manifest",
            {
                "ansible.builtin.command": {
                    "argv": [
                        "/usr/local/bin/llmhost-model",
                        "manifest",
                        f"/srv/llmhost-models/{NAME}",
                    ]
                }
            },
        ),
    )
    _run(
        args.inventory,
        _play(
            "gpu",
            "Make the bench directory",
            {"ansible.builtin.file": {"path": BENCH_DIR, "state": "directory", "mode": "0750"}},
        ),
    )

    results: dict[str, dict] = {}
    for source in SOURCES:
        step = _steps(source, model, address(mirror_host))
        row: dict = {}
        for phase in ("first", "no_change"):
            _drop_caches()
            seconds, per_host = _run(args.inventory, _play("gpu", f"{source}: {phase}", step))
            changed = {h: r.get("changed", False) for h, r in per_host.items()}
            if changed != {h: phase == "first" for h in gpu}:
                sys.exit(f"{source} {phase}: changed per host {changed}, expected the first only")
            row[f"{phase}_seconds"] = round(seconds, 2)
            if source == "mirror":
                row[f"{phase}_host_seconds"] = {
                    h: json.loads(r["stdout"])["seconds"] for h, r in sorted(per_host.items())
                }
        results[source] = row
        print(source, row, flush=True)
    _clean(args.inventory, mirror_host)

    copy = results["copy"]
    for row in results.values():
        row["first_vs_copy"] = round(row["first_seconds"] / copy["first_seconds"], 3)
        row["no_change_vs_copy"] = round(row["no_change_seconds"] / copy["no_change_seconds"], 3)
    scale = PROJECT_BYTES / size * PROJECT_HOSTS / len(gpu)
    projection = {}
    for source, row in results.items():
        # Every first transfer moves the model's bytes to each host from one sender (the
        # controller, or the mirror): bytes x hosts. A no-change step of copy reads every
        # byte on both sides for each host: the same. rsync's and the mirror's read sizes and
        # times only: the step's time does not grow with the bytes (nor, in parallel, with
        # the hosts: kept as measured).
        grows = source == "copy"
        projection[source] = {
            "first_seconds": round(row["first_seconds"] * scale),
            "no_change_seconds": round(row["no_change_seconds"] * (scale if grows else 1), 1),
        }
    data = {
        "run": {**this_run(), "inventory": args.inventory, "gpu_hosts": gpu, "mirror": mirror_host},
        "model": {"bytes": size, "files": files, "shard_bytes": 1 << 30},
        "mirror_intake": {
            "copy_seconds": round(intake_copy, 2),
            "manifest_seconds": round(intake_sums, 2),
        },
        "sources": results,
        "projection": {
            "bytes": PROJECT_BYTES,
            "hosts": PROJECT_HOSTS,
            "scale": round(scale, 2),
            "rule": "first: measured x (bytes / model bytes) x (hosts / gpu hosts); no change: "
            "copy likewise, rsync and mirror as measured",
            "sources": projection,
        },
    }  # fmt: skip
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
