"""The name NVIDIA's CUDA apt repository gives a distribution release, in one place.

NVIDIA's repository paths are ``debian12``, ``ubuntu2204``, ``ubuntu2404``...: Debian by its
major version (``ansible_facts['distribution_version']`` is ``12.11`` on Debian 12.11, which
would give the non-existent ``debian1211``), Ubuntu by its release without the dot.
"""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

# The releases the role supports: NVIDIA publishes a repository for each of these.
SUPPORTED = ("debian12", "ubuntu2204", "ubuntu2404")


def cuda_repo_distro(distribution: str, version: str) -> str:
    """``debian12`` for ('Debian', '12.11'); ``ubuntu2404`` for ('Ubuntu', '24.04')."""
    name = str(distribution).lower()
    version = str(version)
    if name == "debian":
        distro = f"debian{version.split('.')[0]}"
    elif name == "ubuntu":
        distro = f"ubuntu{version.replace('.', '')}"
    else:
        distro = f"{name}{version}"
    if distro not in SUPPORTED:
        raise AnsibleFilterError(
            f"NVIDIA's CUDA repository: {distribution} {version} is not supported by this role "
            f"(supported: {', '.join(SUPPORTED)}); set nvidia_driver_source: distribution, or "
            "nvidia_driver_cuda_repo_distro to the repository's name for this release."
        )
    return distro


class FilterModule:
    """Filters of the nvidia_driver role."""

    def filters(self) -> dict:
        return {"cuda_repo_distro": cuda_repo_distro}
