"""Shared fixtures of the host checks (their helpers are in hostcheck.py).

These checks run in two places: Molecule's verify step (on the test hosts it
created) and `make check` (on an operator's own inventory, read-only). Both
hand pytest an Ansible inventory; testinfra connects the way it says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hostcheck import IN_MOLECULE, READ_ONLY, ReadOnlyHost


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
    if IN_MOLECULE:
        return
    for item in items:
        marker = item.get_closest_marker("molecule_only")
        if marker is not None:
            reason = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "")
            item.add_marker(pytest.mark.skip(reason=f"Molecule only: {reason}"))


@pytest.fixture
def hostvar(host: Any) -> Callable[[str, Any], Any]:
    """Return a lookup of the host's inventory variables, with the role default as fallback.

    Values are templated by Ansible itself (a `debug` call in check mode), so
    variables built from lookups (vault, generated keys) arrive resolved.
    """
    cache: dict[str, Any] = {}

    def lookup(name: str, default: Any = None) -> Any:
        if name not in cache:
            result = host.ansible("ansible.builtin.debug", f"var={name}", check=True)
            value = result.get(name)
            # Ansible prints an undefined variable as a marker string, not as null.
            undefined = isinstance(value, str) and (
                value.startswith("VARIABLE IS NOT DEFINED")
                or (value.startswith("<<") and "is undefined" in value)
            )
            cache[name] = default if value is None or undefined else value
        return cache[name]

    return lookup


@pytest.fixture
def nginx_url(hostvar: Callable[[str, Any], Any]) -> Callable[..., str]:
    """Return a builder of URLs to nginx on the host: https when it has TLS on."""
    scheme = "https" if hostvar("nginx_tls_enabled", False) else "http"
    port = hostvar("nginx_listen_port", 8000)

    def url(path: str, address: str = "127.0.0.1") -> str:
        return f"{scheme}://{address}:{port}{path}"

    return url
