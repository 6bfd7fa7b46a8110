"""Helpers of the host checks in this directory: the read-only guard of `make check`,
secrets on standard input, HTTP from the host itself, a unit's health and sandbox.

A module of its own, not conftest.py: a scenario that adds its own conftest.py beside
these checks (molecule/stack/tests) would shadow ``from conftest import ...``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from typing import Any

import pytest
from testinfra.modules.ansible import AnsibleException

# `make check` (tools/check_hosts.py) sets LLMHOST_CHECK: operators' hosts, read-only.
READ_ONLY = os.environ.get("LLMHOST_CHECK") == "1"
IN_MOLECULE = bool(os.environ.get("MOLECULE_SCENARIO_NAME")) and not READ_ONLY

# Secrets reach a host's command on its standard input through Ansible's command module
# (run_with_stdin): pipelining hands module arguments to the remote Python on its stdin, so
# they are on no command line that sudo or ps shows; and modules must not log their
# arguments (stdin among them) to the host's journal either.
os.environ.setdefault("ANSIBLE_NO_TARGET_SYSLOG", "True")

# Commands that would change a host. The checks never need one; in read-only
# mode a test that tries is failed with this reason instead of running it.
_MUTATING = re.compile(
    r"\b(systemctl\s+(start|stop|restart|reload|enable|disable|mask|unmask|kill|daemon-reload)"
    r"|apt(-get)?\s+(install|remove|purge|upgrade)|dpkg\s+-i|pip\s+(install|uninstall)"
    r"|rm\s|mv\s|cp\s|chmod|chown|truncate|tee\s|sed\s+-i|kill\s|reboot|shutdown)"
    r"|[^0-9&]>\s*(?!/dev/(null|stdout|stderr))\S"
)


def inventory_groups(inventory: str) -> dict[str, set[str]]:
    """Each group of the inventory and every host in it (its children's hosts included)."""
    out = subprocess.run(
        ["ansible-inventory", "-i", inventory, "--list"], check=True, capture_output=True, text=True
    ).stdout
    data = json.loads(out)

    def hosts(group: str, seen: frozenset[str] = frozenset()) -> set[str]:
        entry = data.get(group, {})
        found = set(entry.get("hosts", []))
        for child in entry.get("children", []):
            if child not in seen:
                found |= hosts(child, seen | {group})
        return found

    return {group: hosts(group) for group in data if group != "_meta"}


def hosts_running(groups: dict[str, set[str]]) -> dict[str, set[str]]:
    """What each kind of check applies to, from the groups as the playbooks deploy them:
    vLLM on `gpu` hosts; the gateway and nginx on the `gateway` hosts, or on the `gpu`
    hosts when that group is empty or absent (playbooks/serving.yml); Redis on `redis`;
    Prometheus and Grafana on `monitoring`; the model mirror on `model_mirror`; node exporter
    and llmhost.target everywhere."""
    gpu = groups.get("gpu", set())
    return {
        "vllm": gpu,
        "gateway": groups.get("gateway") or gpu,
        "redis": groups.get("redis", set()),
        "monitoring": groups.get("monitoring", set()),
        "model_mirror": groups.get("model_mirror", set()),
        "all": groups.get("all", set()),
    }


def host_of(item: pytest.Item) -> str | None:
    """The name of the host a collected check runs on (None: not a host check)."""
    callspec = getattr(item, "callspec", None)
    host = callspec.params.get("_testinfra_host") if callspec is not None else None
    return host.backend.get_hostname() if host is not None else None


class ReadOnlyHost:
    """A testinfra host whose commands are refused when they would write."""

    def __init__(self, host: Any) -> None:
        self._host = host

    @staticmethod
    def refuse_mutating(rendered: str) -> None:
        if _MUTATING.search(rendered):
            pytest.fail(f"refused in read-only mode (make check changes no host): {rendered!r}")

    def run(self, command: str, *args: Any, **kwargs: Any) -> Any:
        self.refuse_mutating(
            command % tuple(shlex.quote(str(a)) for a in args) if args else command
        )
        return self._host.run(command, *args, **kwargs)

    # testinfra's other ways to run a command call the wrapped host's own `run`, around
    # this guard: each goes through the guarded `run` here instead.
    def check_output(self, command: str, *args: Any, **kwargs: Any) -> str:
        result = self.run(command, *args, **kwargs)
        assert result.rc == 0, f"Unexpected exit code {result.rc} for {result}"
        return result.stdout.rstrip("\r\n")

    def run_expect(self, expected: list[int], command: str, *args: Any, **kwargs: Any) -> Any:
        result = self.run(command, *args, **kwargs)
        assert result.rc in expected, f"Unexpected exit code {result.rc} for {result}"
        return result

    def run_test(self, command: str, *args: Any, **kwargs: Any) -> Any:
        return self.run_expect([0, 1], command, *args, **kwargs)

    def ansible(self, module: str, module_args: str | None = None, **kwargs: Any) -> Any:
        kwargs["check"] = True  # Ansible's check mode: report, never change
        return self._host.ansible(module, module_args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)


def run_with_stdin(host: Any, argv: list[str], stdin: str) -> tuple[int, str, str]:
    """Run argv on the host with `stdin` on its standard input; return rc, stdout, stderr.

    For secrets: give `stdin` as a template of an inventory variable
    ("{{ llmhost_check_api_key }}"), which Ansible resolves, so the secret is on no
    command line here or on the host.
    """
    if isinstance(host, ReadOnlyHost):
        ReadOnlyHost.refuse_mutating(shlex.join(argv))
        host = host._host
    try:
        result = host.ansible(
            "ansible.builtin.command", json.dumps({"argv": argv, "stdin": stdin}), check=False
        )
    except AnsibleException as failed:  # a non-zero exit status
        result = failed.result
    return int(result.get("rc", 1)), result.get("stdout", ""), result.get("stderr", "")


def http(
    host: Any,
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    body: str | None = None,
    timeout: int = 30,
    source: str | None = None,
    secret_headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], str]:
    """Send one HTTP request from the host itself with curl; return status, headers, body.

    ``secret_headers`` (values may be templates of inventory variables, "Bearer {{ ... }}")
    reach curl on its standard input (``-H @-``), never on a command line: see run_with_stdin.

    ``source`` is the local address the request leaves from (curl --interface): any of
    127.0.0.0/8 works on Linux without configuring it, so a check can come from a network
    that an allow-list leaves out without a second host.
    """
    args = [
        "curl",
        "-sS",
        "-o",
        "/dev/stdout",
        "-D",
        "/dev/stderr",
        "-X",
        method,
        "--max-time",
        str(timeout),
        url,
    ]
    if source is not None:
        args += ["--interface", source]
    if url.startswith("https:"):
        # The checks reach nginx by address, which a certificate need not name;
        # test_nginx_serves_its_configured_certificate checks the certificate.
        args.append("--insecure")
    for name, value in (headers or {}).items():
        args += ["-H", f"{name}: {value}"]
    if body is not None:
        args += ["--data-binary", body, "-H", "Content-Type: application/json"]
    if secret_headers:
        lines = "\n".join(f"{name}: {value}" for name, value in secret_headers.items())
        rc, stdout, stderr = run_with_stdin(host, [*args, "-H", "@-"], lines)
    else:
        result = host.run(" ".join(shlex.quote(a) for a in args))
        rc, stdout, stderr = result.rc, result.stdout, result.stderr
    assert rc == 0, f"curl {method} {url} failed: {stderr}"
    status_line, *header_lines = [line for line in stderr.splitlines() if line.strip()]
    status = int(status_line.split()[1])
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return status, parsed, stdout


def assert_unit_healthy(host: Any, unit: str) -> None:
    """The unit runs, starts at boot, and has not been restarted by systemd after crashes."""
    service = host.service(unit)
    assert service.is_running, f"{unit} is not running (systemctl status {unit})"
    assert service.is_enabled, f"{unit} is not enabled"
    restarts = host.run(f"systemctl show -p NRestarts --value {unit}").stdout.strip()
    assert restarts == "0", f"{unit} restarted {restarts} times (journalctl -u {unit})"


# Every unit on a host, llmhost's own and the distribution's (hardened by drop-ins),
# stays at or below this `systemd-analyze security` figure (10 = no sandbox at all).
EXPOSURE_CEILING = 3.0
_EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")


def unit_exposure(host: Any, unit: str) -> float:
    """The unit's overall exposure, as `systemd-analyze security` scores it (0-10)."""
    result = host.run(f"systemd-analyze security --no-pager {unit}")
    assert result.rc == 0, f"systemd-analyze security {unit}: {result.stderr}"
    match = _EXPOSURE.search(result.stdout)
    assert match, f"no overall exposure level in: {result.stdout[-300:]}"
    return float(match.group(1))


def assert_unit_hardened(host: Any, unit: str) -> None:
    """The unit's sandbox scores at or below EXPOSURE_CEILING; the failure lists what is open."""
    exposure = unit_exposure(host, unit)
    if exposure > EXPOSURE_CEILING:
        report = host.run(f"systemd-analyze security --no-pager {unit}").stdout
        open_options = [line for line in report.splitlines() if line.startswith("✗")]
        pytest.fail(
            f"{unit}: exposure {exposure} > {EXPOSURE_CEILING} (systemd-analyze security {unit}):\n"
            + "\n".join(open_options)
        )


def openai_error(body: str) -> dict[str, Any]:
    """Parse an OpenAI-shaped error body and check its shape."""
    error = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    return error
