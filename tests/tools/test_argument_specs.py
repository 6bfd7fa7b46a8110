"""tools/argument_specs.py: the hand-written specs stay in step with the defaults."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import argument_specs  # a tool of the repository, not a package


def _role(root: Path, name: str, defaults: dict, options: dict, tasks: str = "") -> None:
    (root / name / "defaults").mkdir(parents=True)
    (root / name / "meta").mkdir()
    (root / name / "tasks").mkdir()
    (root / name / "defaults" / "main.yml").write_text(yaml.safe_dump(defaults))
    (root / name / "meta" / "main.yml").write_text("galaxy_info: {}\n")
    spec = {"argument_specs": {"main": {"short_description": name, "options": options}}}
    (root / name / "meta" / "argument_specs.yml").write_text(yaml.safe_dump(spec))
    (root / name / "tasks" / "main.yml").write_text(tasks or "[]\n")


def _problems(root: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setattr(argument_specs, "ROLES", root)
    roles = sorted(p for p in root.iterdir())
    options = {r.name: argument_specs._options(r) for r in roles}
    return [p for r in roles for p in argument_specs.check_role(r, options)]


def test_the_repository_roles_are_in_step(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["argument_specs.py", "--check"])
    assert argument_specs.main() == 0


@pytest.mark.parametrize(
    ("defaults", "options", "expected"),
    [
        ({"web_port": 80}, {}, "web_port has a default but no spec"),
        ({}, {"web_port": {"type": "int", "description": "Port."}}, "has a spec but no default"),
        ({"web_port": "80"}, {"web_port": {"type": "int", "description": "Port."}}, "not of its"),
        (
            {"web_mode": "fast"},
            {"web_mode": {"type": "str", "description": "Mode.", "choices": ["slow"]}},
            "not one of",
        ),
        (
            {"web_key": ""},
            {"web_key": {"type": "str", "description": "Key.", "required": True}},
            "is required but has a default",
        ),
        (
            {"web_a": 1, "web_b": 2},
            {
                "web_a": {"type": "int", "description": "Copied."},
                "web_b": {"type": "int", "description": "Copied."},
            },
            "web_b has the same description as web_a",
        ),
        (
            {"web_hosts": ["a", 2]},
            {"web_hosts": {"type": "list", "elements": "str", "description": "Hosts."}},
            "items [2]",
        ),
        ({}, {"db_size": {"type": "int", "description": "Read."}}, "neither an input nor a fact"),
        ({}, {"db_port": {"type": "str", "description": "Read."}}, "is str here, int in db"),
        ({}, {"other_thing": {"type": "str", "description": "?"}}, "neither this role's input"),
    ],
)
def test_a_spec_out_of_step_is_named(tmp_path, monkeypatch, defaults, options, expected):
    _role(tmp_path, "db", {"db_port": 5432}, {"db_port": {"type": "int", "description": "Port."}})
    _role(tmp_path, "web", defaults, options)
    problems = _problems(tmp_path, monkeypatch)
    assert any(expected in p for p in problems), problems


def test_required_inputs_templates_and_facts_of_other_roles_pass(tmp_path, monkeypatch):
    _role(
        tmp_path,
        "db",
        {"db_port": 5432},
        {"db_port": {"type": "int", "description": "Port."}},
        tasks="- ansible.builtin.set_fact:\n    db_size: 3\n",
    )
    _role(
        tmp_path,
        "web",
        {"web_url": "http://x:{{ db_port }}", "web_limit": None},
        {
            "web_url": {"type": "str", "description": "URL."},
            "web_limit": {"type": "int", "description": "Limit."},
            "web_key": {"type": "str", "description": "Key.", "required": True},
            "db_port": {"type": "int", "description": "Read from db."},
            "db_size": {"type": "int", "description": "A fact of db."},
        },
    )
    assert _problems(tmp_path, monkeypatch) == []


def test_inventory_wide_inputs_have_no_default_and_one_type(tmp_path, monkeypatch):
    _role(
        tmp_path,
        "db",
        {"llmhost_private_address": "10.0.0.1"},
        {"llmhost_private_address": {"type": "str", "description": "Address."}},
    )
    _role(
        tmp_path,
        "web",
        {},
        {"llmhost_private_address": {"type": "raw", "description": "Address."}},
    )
    problems = _problems(tmp_path, monkeypatch)
    assert "roles/db: llmhost_private_address is inventory-wide: no default in a role" in problems
    assert any("different types" in p for p in problems)


@pytest.mark.parametrize(
    "read",
    [
        "{{ hostvars[item].db_port }}",
        "{{ hostvars[groups['db'][0]].db_port }}",
        "{% set hv = hostvars[h] %}{{ hv.db_port | default(5432) }}",
        "{{ groups['db'] | map('extract', hostvars) | selectattr('db_port', 'defined') | list }}",
    ],
)
def test_a_variable_read_of_other_hosts_must_be_declared(tmp_path, monkeypatch, read):
    _role(tmp_path, "db", {"db_port": 5432}, {"db_port": {"type": "int", "description": "Port."}})
    tasks = f'- ansible.builtin.debug:\n    msg: "{read}"\n'
    _role(tmp_path, "web", {}, {}, tasks=tasks)
    problems = _problems(tmp_path, monkeypatch)
    assert any("reads db_port of other hosts" in p for p in problems), problems
    # Declared (read from role db, no default here), it passes; facts never need declaring.
    (tmp_path / "web" / "meta" / "argument_specs.yml").write_text(
        yaml.safe_dump(
            {
                "argument_specs": {
                    "main": {
                        "short_description": "web",
                        "options": {"db_port": {"type": "int", "description": "Read of db."}},
                    }
                }
            }
        )
    )
    (tmp_path / "web" / "tasks" / "main.yml").write_text(
        tasks + '- ansible.builtin.debug:\n    msg: "{{ hostvars[item].ansible_host }}"\n'
    )
    assert _problems(tmp_path, monkeypatch) == []
