"""Model weights through the models' mirror, end to end on the cluster's hosts
(roles/model_mirror on llmhost-redis, vllm_model_source: mirror on both gpu hosts,
inventories/local-cluster): the tiny model on both gpu hosts is the mirror's, every file
verified, and served with the hub out of reach; the role's model step with nothing to change,
timed on each host's own clock; a file whose bytes do not match the manifest fails the run
naming host, instance and file while the model in place goes on serving; a download left half
done is resumed with a Range request for the rest; a disk without room is refused before any
byte moves; only the gpu hosts reach the mirror; a hub model downloaded once by the mirror and
spread from it. (Not test_model_mirror.py: tests/hosts/ has that name, and the verify collects
both.)

What the cut itself looks like (a connection closed in the middle of a file) is tested on
the fetch script over real HTTP (tests/roles/test_model_mirror.py); here the half-done file is
put where a cut leaves it, and the real mirror (nginx) answers the resumed request."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import secrets
import shlex
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cluster import GATEWAYS, GPU_HOSTS, REDIS, SCENARIO, Cluster, address, inventory

testinfra_hosts = ["ansible://llmhost-gpu1"]

PROJECT = SCENARIO.parent.parent
MIRROR = REDIS  # the scenario's model_mirror host
ON_MIRROR = "/srv/llmhost-models/tiny"
MODEL = "/var/lib/vllm/models/tiny"
# The controller's address on the scenario's network, where the mirror host reaches it.
GATEWAY_IP = "{{(index .IPAM.Config 0).Gateway}}"
FETCH_TASK = "Fetch the models from their mirror, verified against SHA256SUMS"
# The no-change model step, per host (docs/operating.md's figure, tools/readme_figures.py).
RESULTS = SCENARIO / "mirror.json"


def _url() -> str:
    return f"http://{address(MIRROR)}:8090/tiny"


def _model_step(limit: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """site.yml's vLLM model step (--tags vllm_model) on ``limit`` (and the mirror, whose
    address the gpu hosts' URL is made of), as an operator runs it; its JSON results."""
    return _site(f"{limit},model_mirror", "vllm_model")


def _site(
    limit: str, tags: str, extra: dict[str, Any] | None = None
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """site.yml with ``--limit``, ``--tags`` and extra variables; its JSON results."""
    run = subprocess.run(
        [
            *("ansible-playbook", "-i", inventory(), str(PROJECT / "site.yml")),
            *("--limit", limit, "--tags", tags),
            *(("-e", json.dumps(extra)) if extra else ()),
        ],
        capture_output=True,
        text=True,
        env=dict(
            os.environ,
            ANSIBLE_ROLES_PATH=str(PROJECT / "roles"),
            ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json",
            # The repository's settings: Molecule's add profile_tasks' lines to the JSON.
            ANSIBLE_CONFIG=str(PROJECT / "ansible.cfg"),
        ),
        timeout=600,
        cwd=PROJECT,
    )
    return run, json.loads(run.stdout)


def _standin_hub() -> ModuleType:
    """tests/roles/standin_hub.py: a stand-in hub (no hub is reachable from the test bed)."""
    path = PROJECT / "tests" / "roles" / "standin_hub.py"
    spec = importlib.util.spec_from_file_location("standin_hub", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _task(results: dict[str, Any], name: str) -> dict[str, Any]:
    """The hosts' results of the task called ``name``."""
    for play in results["plays"]:
        for task in play["tasks"]:
            if task["task"]["name"].rpartition(" : ")[2] == name:  # "<role> : <task>"
                return task["hosts"]
    raise AssertionError(f"no task {name!r} ran")


def _fetch(cluster: Cluster, host: str, dest: str, *extra: str, url: str = "") -> Any:
    """The fetch script on ``host`` as the vllm user, as the role runs it."""
    argv = ["/usr/local/bin/llmhost-model", "fetch", "--url", url or _url(), "--dest", dest]
    argv += extra
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
        # vLLM started after the model was verified and put in place: it serves those bytes.
        started = 'date -d "$(systemctl show -p ActiveEnterTimestamp --value vllm)" +%s'
        verified = cluster.run(h, f"stat -c %Y {MODEL}/.llmhost-manifest.json")
        assert int(cluster.run(h, started)) >= int(verified), h


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


def test_a_hub_model_is_downloaded_once_by_the_mirror_and_spread_from_it(cluster: Cluster):
    """The tiny model's files as a gated hub repository at a commit (a stand-in hub on the
    controller, which the mirror host reaches on the scenario's network): the mirror role
    downloads it once with the token, its SHA256SUMS the hub's own hashes; both gpu hosts
    fetch it from the mirror and never ask the hub; a re-run downloads nothing."""
    standin = _standin_hub()
    model = Path(os.environ["LLMHOST_CACHE_DIR"]) / "tiny-model"
    files = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    hub = standin.Hub(files, token="hf_" + secrets.token_hex(12), bind="0.0.0.0")
    network = subprocess.run(
        [*("docker", "network", "inspect", "llmhost-molecule-cluster"), "-f", GATEWAY_IP],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    extra = {
        "model_mirror_models": [
            {"name": "tiny", "src": str(model)},
            {"name": "tiny-hub", "hub_id": standin.REPO, "revision": standin.COMMIT},
        ],
        "model_mirror_hub_endpoint": f"http://{network}:{hub.port}",
        "model_mirror_hf_token": hub.token,
    }
    on_mirror, scratch = "/srv/llmhost-models/tiny-hub", "/var/lib/vllm/models/hub-test"
    task = "Download the hub models, checked against the hub's own hashes"
    try:
        run, results = _site("model_mirror", "model_mirror_models", extra)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        (first,) = _task(results, task)[MIRROR]["results"]
        assert json.loads(first["stdout"])["commit"] == standin.COMMIT and first["changed"]
        assert hub.token not in run.stdout  # the token reached the hub through a file
        assert (
            cluster.run(MIRROR, "stat -c '%U %a' /etc/llmhost-model-mirror/hf-token")
            == "root 600\n"
        )
        manifest = cluster.run(MIRROR, f"cat {on_mirror}/SHA256SUMS")
        for entry in hub.siblings():
            want = entry["lfs"]["sha256"] if "lfs" in entry else None
            want = want or hashlib.sha256(files[entry["rfilename"]]).hexdigest()
            assert f"{want}  {entry['rfilename']}\n" in manifest, (entry, manifest)
        once = {p: len(d) for p, d in files.items()}
        assert dict(hub.sent) == once
        for h in GPU_HOSTS:
            fetched = _fetch(cluster, h, scratch, "--margin", "0", url=f"{_url()}-hub")
            assert fetched.rc == 0, fetched.stderr
            assert json.loads(fetched.stdout)["changed"] is True
            cluster.run(h, f"cd {scratch} && sha256sum --quiet --strict -c SHA256SUMS")
        assert dict(hub.sent) == once  # the gpu hosts fetched from the mirror only
        run, results = _site("model_mirror", "model_mirror_models", extra)
        assert run.returncode == 0, run.stdout[-3000:]
        (again,) = _task(results, task)[MIRROR]["results"]
        assert not again["changed"] and dict(hub.sent) == once
    finally:
        hub.close()
        cluster.run(MIRROR, f"rm -rf {on_mirror} /etc/llmhost-model-mirror/hf-token")
        for h in GPU_HOSTS:
            cluster.run(h, f"rm -rf {scratch} {scratch}.staging")
