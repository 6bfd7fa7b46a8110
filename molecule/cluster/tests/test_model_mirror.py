"""The models' mirror end to end on the cluster's hosts (roles/model_mirror on llmhost-redis,
vllm_model_source: mirror on both gpu hosts, inventories/local-cluster): the tiny model on
both gpu hosts is the mirror's, every file verified, and served with the hub out of reach;
the role's model step with nothing to change, timed on each host's own clock; a file whose
bytes do not match the manifest fails the run naming host, instance and file while the model
in place goes on serving; a download left half done is resumed with a Range request for the
rest; a disk without room is refused before any byte moves; only the gpu hosts reach the
mirror.

What the cut itself looks like (a connection closed in the middle of a file) is tested on
the fetch script over real HTTP (tests/roles/test_model_mirror.py); here the half-done file is
put where a cut leaves it, and the real mirror (nginx) answers the resumed request."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from datetime import UTC, datetime
from typing import Any

import pytest
from cluster import GATEWAYS, GPU_HOSTS, REDIS, SCENARIO, Cluster, address, inventory

testinfra_hosts = ["ansible://llmhost-gpu1"]

PROJECT = SCENARIO.parent.parent
MIRROR = REDIS  # the scenario's model_mirror host
ON_MIRROR = "/srv/llmhost-models/tiny"
MODEL = "/var/lib/vllm/models/tiny"
FETCH_TASK = "Fetch the models from their mirror, verified against SHA256SUMS"
# The no-change model step, per host (docs/operating.md's figure, tools/readme_figures.py).
RESULTS = SCENARIO / "mirror.json"


def _url() -> str:
    return f"http://{address(MIRROR)}:8090/tiny"


def _model_step(limit: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """site.yml's vLLM model step (--tags vllm_model) on ``limit`` (and the mirror, whose
    address the gpu hosts' URL is made of), as an operator runs it; its JSON results."""
    run = subprocess.run(
        [
            *("ansible-playbook", "-i", inventory(), str(PROJECT / "site.yml")),
            *("--limit", f"{limit},model_mirror", "--tags", "vllm_model"),
        ],
        capture_output=True,
        text=True,
        env=dict(
            os.environ,
            ANSIBLE_ROLES_PATH=str(PROJECT / "roles"),
            ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json",
            ANSIBLE_CALLBACKS_ENABLED="",  # no profile_tasks (Molecule's) in the JSON
        ),
        timeout=600,
        cwd=PROJECT,
    )
    return run, json.loads(run.stdout)


def _task(results: dict[str, Any], name: str) -> dict[str, Any]:
    """The hosts' results of the task called ``name``."""
    for play in results["plays"]:
        for task in play["tasks"]:
            if task["task"]["name"] == name:
                return task["hosts"]
    raise AssertionError(f"no task {name!r} ran")


def _fetch(cluster: Cluster, host: str, dest: str, *extra: str) -> Any:
    """The fetch script on ``host`` as the vllm user, as the role runs it."""
    argv = ["/usr/local/bin/llmhost-model", "fetch", "--url", _url(), "--dest", dest, *extra]
    return cluster.hosts[host].run("runuser -u vllm -- " + shlex.join(argv))


def test_both_gpu_hosts_serve_the_mirrors_model_every_file_verified(cluster: Cluster):
    manifest = cluster.run(MIRROR, f"cat {ON_MIRROR}/SHA256SUMS")
    assert "config.json" in manifest
    for h in GPU_HOSTS:
        assert cluster.run(h, f"cat {MODEL}/SHA256SUMS") == manifest, h
        # Every byte on the host checked again here, by sha256sum itself.
        cluster.run(h, f"cd {MODEL} && sha256sum --quiet --strict -c SHA256SUMS")
        # Served offline: the hub is out of reach from the host, and vLLM is told not to try.
        hub = cluster.hosts[h].run("curl -sS -m 5 -o /dev/null https://huggingface.co")
        assert hub.rc != 0, f"{h} reached the hub"
        env = cluster.run(h, "systemctl show -p Environment --value vllm")
        assert "HF_HUB_OFFLINE=1" in env, env
        served = cluster.run(h, "systemctl show -p ActiveEnterTimestampMonotonic --value vllm")
        fetched = cluster.run(h, f"stat -c %Y {MODEL}/.llmhost-manifest.json")
        assert int(served) > 0 and int(fetched) > 0


def test_only_the_gpu_hosts_reach_the_mirror(cluster: Cluster):
    probe = "curl -sS -m 3 -o /dev/null -w '%%{http_code}' %s"
    url = _url() + "/SHA256SUMS"
    assert cluster.run(GPU_HOSTS[0], probe, url) == "200"
    refused = cluster.hosts[GATEWAYS[0]].run(probe, url)
    assert refused.stdout != "200", refused.stdout


def test_the_model_step_with_nothing_to_change_reads_no_model_byte(cluster: Cluster):
    run, results = _model_step("gpu")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    fetches = _task(results, FETCH_TASK)
    figures = {}
    for h in GPU_HOSTS:
        (item,) = fetches[h]["results"]
        out = json.loads(item["stdout"])
        assert out["changed"] is False and not item["changed"], (h, out)
        # The script's own time on the host's clock, and the command's (start to end, also
        # the host's clock, Python's start included).
        start, end = (datetime.fromisoformat(item[k]) for k in ("start", "end"))
        figures[h] = {
            "script_seconds": out["seconds"],
            "command_seconds": (end - start).total_seconds(),
        }
        assert out["seconds"] < 5, (h, out)
    print("no-change model step:", figures)
    RESULTS.write_text(
        json.dumps(
            {
                "run": {
                    "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
                    "commit": subprocess.run(
                        ["git", "rev-parse", "--short", "HEAD"],
                        capture_output=True,
                        text=True,
                        cwd=PROJECT,
                        check=False,
                    ).stdout.strip(),
                },
                "model_bytes": int(
                    cluster.run(GPU_HOSTS[0], f"du -sb --apparent-size {MODEL}").split()[0]
                ),
                "no_change": figures,
            },
            indent=2,
        )
        + "\n"
    )


@pytest.fixture
def mirror_changed(cluster: Cluster):
    """A new generation_config.json on the mirror, in its manifest; put back after."""
    name = f"{ON_MIRROR}/generation_config.json"
    cluster.run(MIRROR, f"cp -p {name} /root/generation_config.json.kept")
    cluster.run(MIRROR, f"echo >> {name} && /usr/local/bin/llmhost-model manifest {ON_MIRROR}")
    yield name
    cluster.run(MIRROR, f"cp -p /root/generation_config.json.kept {name}")
    cluster.run(MIRROR, f"/usr/local/bin/llmhost-model manifest {ON_MIRROR}")


def test_a_file_not_matching_the_manifest_fails_the_run_and_the_old_model_serves(
    cluster: Cluster, mirror_changed: str
):
    host = GPU_HOSTS[0]
    before = cluster.run(host, f"cd {MODEL} && sha256sum SHA256SUMS generation_config.json")
    pid = cluster.run(host, "systemctl show -p MainPID --value vllm").strip()
    # One byte of the new file changed after the manifest was written: the mirror's disk (or
    # anything between) gave other bytes than the ones the manifest names.
    flip = "b = bytearray(open(p, 'rb').read()); b[0] ^= 1; open(p, 'wb').write(b)"
    cluster.run(MIRROR, f"python3 -c \"p = '{mirror_changed}'; {flip}\"")

    run, _ = _model_step(host)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out[-3000:]
    assert f"{host}, vllm.service (tiny): llmhost-model: generation_config.json: sha256" in out, (
        out[-3000:]
    )
    assert "does not match SHA256SUMS" in out
    # The model in place untouched, the same vLLM process serving it.
    assert cluster.run(host, f"cd {MODEL} && sha256sum SHA256SUMS generation_config.json") == before
    assert cluster.run(host, "systemctl show -p MainPID --value vllm").strip() == pid
    vllm = f"http://{cluster.run(host, 'hostname -I').split()[0]}:8002/v1/models"
    key = "$(sed -n 's/^VLLM_API_KEY=//p' /etc/vllm/vllm.env)"
    models = cluster.run(host, f'curl -sS -f -H "Authorization: Bearer {key}" {vllm}')
    assert '"tiny"' in models, models


def test_a_half_fetched_file_is_resumed_with_a_range_request(cluster: Cluster):
    host = GPU_HOSTS[1]
    scratch = "/var/lib/vllm/models/resume-test"
    since = cluster.run(MIRROR, "date '+%Y-%m-%d %H:%M:%S'").strip()
    sizes = {
        line.split()[1]: int(line.split()[0])
        for line in cluster.run(
            host, f"cd {MODEL} && stat -c '%s %n' $(cut -c67- SHA256SUMS)"
        ).splitlines()
    }
    big = max(sizes, key=sizes.__getitem__)
    half = sizes[big] // 2
    # Where a cut download leaves it: the first half, in the staging directory.
    cluster.run(
        host,
        f"rm -rf {scratch} {scratch}.staging && install -d -o vllm -g vllm {scratch}.staging && "
        f"head -c {half} {MODEL}/{big} > {scratch}.staging/{big} && "
        f"chown vllm: {scratch}.staging/{big}",
    )
    try:
        fetched = _fetch(cluster, host, scratch, "--margin", "0")
        assert fetched.rc == 0, fetched.stderr
        out = json.loads(fetched.stdout)
        assert out["changed"] is True
        assert out["bytes_transferred"] == sum(sizes.values()) - half, (out, sizes, half)
        cluster.run(host, f"cd {scratch} && sha256sum --quiet --strict -c SHA256SUMS")
        log = cluster.run(
            MIRROR, f"journalctl -t llmhost_model_mirror -o cat --no-pager --since '{since}'"
        )
        ranged = [line for line in log.splitlines() if f"/tiny/{big} " in line and '" 206 ' in line]
        assert ranged, log[-2000:]
    finally:
        cluster.run(host, f"rm -rf {scratch} {scratch}.staging")


def test_a_disk_without_room_is_refused_before_any_transfer(cluster: Cluster):
    host = GPU_HOSTS[1]
    scratch = "/var/lib/vllm/models/full-disk-test"
    try:
        refused = _fetch(cluster, host, scratch, "--margin", "0", "--assume-free", "1000")
        assert refused.rc == 1, refused.stdout
        assert f"{scratch}.staging:" in refused.stderr and "1000 free" in refused.stderr
        assert "bytes needed" in refused.stderr, refused.stderr
        assert cluster.run(host, f"ls -A {scratch}.staging") == ""  # nothing fetched
        assert cluster.hosts[host].run(f"test -e {scratch}").rc != 0
    finally:
        cluster.run(host, f"rm -rf {scratch} {scratch}.staging")
