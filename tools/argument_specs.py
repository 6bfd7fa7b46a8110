"""Check every role's meta/argument_specs.yml against its defaults/main.yml (`make lint`).

    python tools/argument_specs.py --check

The specs are written by hand (types, choices, elements, required, one line of
description each), as prometheus-community does; this keeps them honest:

- every variable in defaults/main.yml has a spec, with a type its default fits;
- every spec option of the role's own prefix has a default, unless it is
  `required` (then it stays in defaults/main.yml only as a comment);
- options of another role's prefix are the variables this role reads from that
  role: they must be that role's inputs (of the same type) or facts it sets, and
  have no default here;
- options prefixed `llmhost_` are inventory-wide inputs that several roles read
  of every host (its private address, say): no role gives them a default (each
  falls back in its expressions), and every role that declares one gives it
  the same type;
- a default that is not a template is one of the option's `choices`, and a list
  default's items fit `elements`;
- descriptions are present and no two options of a role share one;
- a variable the role reads of another host (`hostvars[h].name`, `hv.name`, or
  `selectattr('name')` over extracted hostvars) is declared in its spec, so the
  variables one role takes from the others are all written down.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROLES = Path(__file__).resolve().parent.parent / "roles"

# Python types a default of each spec type may have (None: unset, always allowed).
_FITS: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "path": (str,),
    "int": (int,),
    "float": (float, int),
    "bool": (bool,),
    "list": (list,),
    "dict": (dict,),
    "raw": (object,),
}


def _fits(value: Any, spec_type: str) -> bool:
    if value is None or (isinstance(value, str) and "{{" in value):
        return True  # unset, or a template: its type is known only when it renders
    if spec_type not in _FITS:
        return False
    if isinstance(value, bool) and spec_type in ("int", "float"):
        return False
    return isinstance(value, _FITS[spec_type])


def _options(role: Path) -> dict[str, dict[str, Any]]:
    spec = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text()) or {}
    options: dict[str, dict[str, Any]] = {}
    for entry in (spec.get("argument_specs") or {}).values():
        options.update(entry.get("options") or {})
    return options


def _sets_fact(role: Path, name: str) -> bool:
    """Whether the role's tasks set `name` as a fact (an output other roles read)."""
    return any(f"    {name}:" in f.read_text() for f in (role / "tasks").glob("*.yml"))


def _prefix(role: Path) -> str:
    return role.name + "_"


# Reads of another host's variables: hostvars[h].name, hv.name (hv = hostvars[h]),
# and (select|reject)attr('name') over `map('extract', hostvars)`.
_HOSTVARS_READS = (
    re.compile(r"hostvars\[(?:[^\[\]]|\[[^\]]*\])+\]\.(\w+)"),
    re.compile(r"\bhv\.(\w+)"),
    re.compile(r"extract', hostvars\)[\s|]*(?:\w+\('\w+'\)[\s|]*)*?(?:select|reject)attr\('(\w+)'"),
)
# Facts and connection variables: Ansible's, never a role's input.
_NOT_INPUTS = ("ansible_", "inventory_", "group_names", "groups")


def hostvars_reads(role: Path) -> set[str]:
    """The variables a role reads of other hosts, from its tasks, vars and templates."""
    names: set[str] = set()
    for path in sorted(role.rglob("*")):
        if path.suffix not in (".yml", ".j2") or not path.is_file():
            continue
        text = path.read_text()
        for pattern in _HOSTVARS_READS:
            names.update(pattern.findall(text))
    return {n for n in names if not n.startswith(_NOT_INPUTS)}


# Inventory-wide inputs, read by several roles of every host (see the module docstring).
SHARED_PREFIX = "llmhost_"


def check_role(role: Path, all_options: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Problems of one role's spec against its defaults (empty: in step)."""
    defaults_file = role / "defaults" / "main.yml"
    defaults = yaml.safe_load(defaults_file.read_text()) if defaults_file.exists() else {}
    defaults = defaults or {}
    options = all_options[role.name]
    prefixes = {_prefix(ROLES / name): name for name in all_options}
    problems = []
    where = f"roles/{role.name}"
    for name, value in defaults.items():
        option = options.get(name)
        if option is None:
            problems.append(f"{where}: {name} has a default but no spec in meta/argument_specs.yml")
            continue
        if not _fits(value, option.get("type", "str")):
            problems.append(
                f"{where}: {name} defaults to {value!r}, which is not of its spec type "
                f"{option.get('type', 'str')}"
            )
        choices = option.get("choices")
        if choices and not (isinstance(value, str) and "{{" in value) and value not in choices:
            problems.append(f"{where}: {name} defaults to {value!r}, not one of {choices}")
        elements = option.get("elements")
        if isinstance(value, list) and elements:
            bad = [v for v in value if not _fits(v, elements)]
            if bad:
                problems.append(f"{where}: {name} has items {bad!r} that are not {elements}")
        if option.get("required"):
            problems.append(
                f"{where}: {name} is required but has a default "
                "(comment it out in defaults/main.yml)"
            )
    seen: dict[str, str] = {}
    for name, option in options.items():
        description = str(option.get("description") or "").strip()
        if not description:
            problems.append(f"{where}: {name} has no description")
        elif description in seen:
            problems.append(f"{where}: {name} has the same description as {seen[description]}")
        seen.setdefault(description, name)
        if "type" not in option:
            problems.append(f"{where}: {name} has no type")
        owner = next((r for p, r in prefixes.items() if name.startswith(p)), None)
        if owner is None and name.startswith(SHARED_PREFIX):
            if name in defaults:
                problems.append(f"{where}: {name} is inventory-wide: no default in a role")
            types = {o[name].get("type") for o in all_options.values() if name in o}
            if len(types) > 1:
                problems.append(
                    f"{where}: {name} has different types in the roles: {sorted(types)}"
                )
            continue
        if owner == role.name:
            if name not in defaults and not option.get("required"):
                problems.append(
                    f"{where}: {name} has a spec but no default (give one, or make it required)"
                )
        elif owner is not None:
            # Read from another role: declared here, defined there.
            theirs = all_options[owner].get(name)
            if name in defaults:
                problems.append(f"{where}: {name} belongs to role {owner}: no default here")
            if theirs is None and not _sets_fact(ROLES / owner, name):
                problems.append(f"{where}: {name} is neither an input nor a fact of role {owner}")
            elif theirs is not None and theirs.get("type") != option.get("type"):
                problems.append(
                    f"{where}: {name} is {option.get('type')} here, {theirs.get('type')} in {owner}"
                )
        else:
            problems.append(f"{where}: {name} is neither this role's input nor another role's")
    for name in sorted(hostvars_reads(role) - set(options)):
        problems.append(
            f"{where}: reads {name} of other hosts (hostvars) but does not declare it "
            "in meta/argument_specs.yml"
        )
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", required=True)
    parser.parse_args()
    roles = sorted(p for p in ROLES.iterdir() if (p / "meta" / "main.yml").exists())
    problems = []
    for role in roles:
        if not (role / "meta" / "argument_specs.yml").exists():
            problems.append(f"roles/{role.name}: no meta/argument_specs.yml")
    all_options = {
        r.name: _options(r) for r in roles if (r / "meta" / "argument_specs.yml").exists()
    }
    for role in roles:
        if role.name in all_options:
            problems += check_role(role, all_options)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
