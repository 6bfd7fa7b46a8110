"""Keep every role's meta/argument_specs.yml in step with its defaults/main.yml.

    python tools/argument_specs.py --write   regenerate the specs
    python tools/argument_specs.py --check   fail when a spec is out of date (lint)

The defaults file is the source: each variable's description is the comment
block right above it (a variable without one is an error), and its type is
read off the default (Jinja expressions and nulls are `raw`).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

ROLES = Path(__file__).resolve().parent.parent / "roles"


def _type_of(value: object) -> str:
    if isinstance(value, str) and "{{" in value:
        return "raw"
    for python_type, name in (
        (bool, "bool"),
        (int, "int"),
        (float, "float"),
        (str, "str"),
        (list, "list"),
        (dict, "dict"),
    ):
        if isinstance(value, python_type):
            return name
    return "raw"


def _descriptions(text: str, prefix: str) -> dict[str, str]:
    """Map each top-level variable to the comment block above it."""
    found: dict[str, str] = {}
    block: list[str] = []
    example = False
    for line in text.splitlines():
        if line.startswith("#"):
            # Commented-out examples (YAML under the prose) are not part of the description,
            # and their Jinja would be templated by Ansible's argument validation.
            body = line[1:]
            example = (
                example
                or body.strip().startswith(f"{prefix}_")
                or bool(re.match(r"(\s?- |\s{3,})", body))
            )
            if not example:
                block.append(body.strip())
        elif line and not line.startswith((" ", "-")) and ":" in line:
            name = line.split(":", 1)[0]
            # A comment block describes the variables that follow it until a blank line.
            found[name] = " ".join(b for b in block if b) if block else found.get("__last__", "")
            example = False
            found["__last__"] = found[name]
        elif not line.strip():
            block = []
            example = False
            found["__last__"] = ""
        else:
            block = []
            example = False
    found.pop("__last__", None)
    return found


def build(role: Path) -> tuple[dict, list[str]]:
    text = (role / "defaults" / "main.yml").read_text()
    defaults = yaml.safe_load(text) or {}
    descriptions = _descriptions(text, role.name)
    problems = []
    options = {}
    for name, value in defaults.items():
        description = descriptions.get(name, "")
        if not description:
            problems.append(f"{role.name}: {name} has no comment above it in defaults/main.yml")
        option = {"type": _type_of(value), "description": description or name}
        if option["type"] == "list" and value and all(isinstance(v, str) for v in value):
            option["elements"] = "str"
        options[name] = option
    meta = yaml.safe_load((role / "meta" / "main.yml").read_text())
    spec = {
        "argument_specs": {
            "main": {
                "short_description": meta["galaxy_info"]["description"],
                "options": options,
            }
        }
    }
    return spec, problems


def render(spec: dict) -> str:
    body = yaml.safe_dump(spec, sort_keys=False, width=120, default_flow_style=False)
    return "---\n# Generated from defaults/main.yml by tools/argument_specs.py --write.\n" + body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    args = parser.parse_args()
    failed = False
    # common is imported by entry point (tasks_from) and has no inputs in defaults/main.yml.
    roles = (p for p in ROLES.iterdir() if (p / "defaults" / "main.yml").exists())
    for role in sorted(r for r in roles if r.name != "common"):
        spec, problems = build(role)
        for problem in problems:
            print(problem, file=sys.stderr)
            failed = True
        target = role / "meta" / "argument_specs.yml"
        wanted = render(spec)
        if args.write:
            target.write_text(wanted)
        elif not target.exists() or target.read_text() != wanted:
            print(
                f"{target.relative_to(ROLES.parent)} is out of date: run "
                "python tools/argument_specs.py --write",
                file=sys.stderr,
            )
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
