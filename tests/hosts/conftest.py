"""Shared fixtures of the host checks (their helpers are in hostcheck.py).

These checks run in two places: Molecule's verify step (on the test hosts it
created) and `make check` (on an operator's own inventory, read-only). Both
hand pytest an Ansible inventory; testinfra connects the way it says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hostcheck import (
    IN_MOLECULE,
    READ_ONLY,
    ReadOnlyHost,
    host_of,
    hosts_running,
    inventory_groups,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "molecule_only(reason): needs setup that only a Molecule scenario provides; "
        "skipped against real hosts",
    )


@pytest.fixture
def host(host: Any) -> Any:
    """testinfra's host, made read-only under `make check`."""
    return ReadOnlyHost(host) if READ_ONLY else host


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _keep_the_hosts_that_run_it(config, items)
    if IN_MOLECULE:
        return
    for item in items:
        marker = item.get_closest_marker("molecule_only")
        if marker is not None:
            reason = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "")
            item.add_marker(pytest.mark.skip(reason=f"Molecule only: {reason}"))


def _keep_the_hosts_that_run_it(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each check module names what it checks (its ``SERVICE``) and is collected for every
    host; the hosts whose groups do not make them run it are deselected (not skipped: a
    host is checked for what it runs, and for nothing else)."""
    inventory = config.getoption("ansible_inventory", None)
    if not inventory:
        return
    runs: dict[str, set[str]] | None = None
    kept, dropped = [], []
    for item in items:
        service = getattr(getattr(item, "module", None), "SERVICE", None)
        host = host_of(item)
        if service is None or host is None:
            kept.append(item)
            continue
        if runs is None:
            runs = hosts_running(inventory_groups(inventory))
        (kept if host in runs[service] else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


# Inventory variables per (host, name), for the whole run: each lookup is an Ansible run
# (seconds on a busy machine), and the inventory does not change while the checks run.
_HOSTVARS: dict[tuple[str, str], Any] = {}
_UNDEFINED = object()


@pytest.fixture
def hostvar(host: Any) -> Callable[[str, Any], Any]:
    """Return a lookup of the host's inventory variables, with the role default as fallback.

    Values are templated by Ansible itself (a `debug` call in check mode), so
    variables built from lookups (vault, generated keys) arrive resolved.
    """
    name_of_host = host.backend.get_hostname()

    def lookup(name: str, default: Any = None) -> Any:
        key = (name_of_host, name)
        if key not in _HOSTVARS:
            result = host.ansible("ansible.builtin.debug", f"var={name}", check=True)
            value = result.get(name)
            # Ansible prints an undefined variable as a marker string, not as null.
            undefined = isinstance(value, str) and (
                value.startswith("VARIABLE IS NOT DEFINED")
                or (value.startswith("<<") and "is undefined" in value)
            )
            _HOSTVARS[key] = _UNDEFINED if value is None or undefined else value
        value = _HOSTVARS[key]
        return default if value is _UNDEFINED else value

    return lookup


@pytest.fixture
def nginx_url(hostvar: Callable[[str, Any], Any]) -> Callable[..., str]:
    """Return a builder of URLs to nginx on the host: https when it has TLS on."""
    scheme = "https" if hostvar("nginx_tls_enabled", False) else "http"
    port = hostvar("nginx_listen_port", 8000)

    def url(path: str, address: str = "127.0.0.1") -> str:
        return f"{scheme}://{address}:{port}{path}"

    return url
