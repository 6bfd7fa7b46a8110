"""tools/testbed: two checkouts on one machine share the test-host image and keep their keys.

The image holds no SSH key (each host gets its checkout's public key mounted when it is made),
so its name, which changes with its recipe, must not change with the key; and every way the
project makes a host mounts the key sshd reads. The live half (a host made from the image
logs in with the mounted key only) is checked by every Molecule scenario, which reaches its
hosts over SSH.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TESTBED = REPO / "tools" / "testbed"
KEY_FILE = "/etc/ssh/testbed_authorized_keys"


def _image(state: Path) -> str:
    env = dict(os.environ, LLMHOST_TESTBED_STATE=str(state))
    env.pop("LLMHOST_TESTBED_IMAGE", None)
    out = subprocess.run(
        [str(TESTBED), "image"], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout.strip()


def test_two_checkouts_with_their_own_keys_share_one_image(tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    image = _image(first)
    assert re.fullmatch(r"llmhost-systemd:bookworm-[0-9a-f]{12}", image), image
    assert _image(second) == image
    keys = [(d / "ssh" / "id_ed25519.pub").read_text() for d in (first, second)]
    assert keys[0] != keys[1], "each checkout makes its own key"


def test_the_image_recipe_installs_no_key_and_sshd_reads_the_mounted_one() -> None:
    script = TESTBED.read_text()
    # The image is what build_image() makes, its name what image_name() hashes.
    for function in ("build_image", "image_name"):
        body = re.search(rf"^{function}\(\) \{{\n(.*?)^\}}$", script, re.M | re.S)
        assert body is not None, function
        assert "$key" not in body.group(1), f"{function} uses the checkout's key"
    assert f"AuthorizedKeysFile {KEY_FILE}" in script


def test_every_host_the_project_makes_mounts_the_checkouts_key() -> None:
    mount = f"/.cache/testbed/ssh/id_ed25519.pub:{KEY_FILE}:ro"
    for scenario in sorted((REPO / "molecule").glob("*/molecule.yml")):
        platforms = yaml.safe_load(scenario.read_text())["platforms"]
        for platform in platforms:
            volumes = platform.get("volumes", [])
            assert any(v.endswith(mount) for v in volumes), (scenario, platform["name"])
    playbook = (REPO / "playbooks" / "testbed-host.yml").read_text()
    assert "testbed_key_mount" in playbook and f"/ssh/id_ed25519.pub:{KEY_FILE}:ro" in playbook
