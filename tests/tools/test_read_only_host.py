"""`make check`'s read-only guard (tests/hosts/hostcheck.py): every way the host checks
run a command goes through it, and a command that would write never reaches the host."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

_spec = importlib.util.spec_from_file_location(
    "hostcheck", Path(__file__).resolve().parents[2] / "tests" / "hosts" / "hostcheck.py"
)
hostcheck = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hostcheck)


class FakeHost:
    """Stands in for testinfra's Host: its helpers call its own run(), as testinfra's do."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.ansible_calls: list[tuple] = []

    def run(self, command: str, *args: str, **kwargs: object) -> SimpleNamespace:
        self.ran.append(command % args if args else command)
        return SimpleNamespace(rc=0, stdout="out\n", stderr="")

    def check_output(self, command: str, *args: str, **kwargs: object) -> str:
        return self.run(command, *args).stdout.rstrip()

    def run_expect(self, expected: list[int], command: str, *args: str) -> SimpleNamespace:
        return self.run(command, *args)

    def run_test(self, command: str, *args: str) -> SimpleNamespace:
        return self.run(command, *args)

    def ansible(self, module: str, module_args: str | None = None, **kwargs: object) -> dict:
        self.ansible_calls.append((module, module_args, kwargs))
        return {"rc": 0, "stdout": "", "stderr": ""}


WRITES = [
    "rm -rf /etc/llm-proxy",
    "systemctl restart nginx",
    "chmod 0644 /etc/x",
    "echo x > /etc/y",
]


@pytest.mark.parametrize("command", WRITES)
@pytest.mark.parametrize("method", ["run", "check_output", "run_expect", "run_test"])
def test_a_writing_command_is_refused_whichever_way_it_is_run(method, command):
    fake = FakeHost()
    guarded = hostcheck.ReadOnlyHost(fake)
    call = getattr(guarded, method)
    args = ([0], command) if method == "run_expect" else (command,)
    with pytest.raises(pytest.fail.Exception, match="refused in read-only mode"):
        call(*args)
    assert fake.ran == []


@pytest.mark.parametrize("method", ["run", "check_output", "run_expect", "run_test"])
def test_a_reading_command_runs(method):
    fake = FakeHost()
    guarded = hostcheck.ReadOnlyHost(fake)
    args = ([0], "cat /etc/hostname") if method == "run_expect" else ("cat /etc/hostname",)
    getattr(guarded, method)(*args)
    assert fake.ran == ["cat /etc/hostname"]


def test_a_command_given_a_secret_on_stdin_is_guarded_too():
    fake = FakeHost()
    guarded = hostcheck.ReadOnlyHost(fake)
    with pytest.raises(pytest.fail.Exception, match="refused in read-only mode"):
        hostcheck.run_with_stdin(guarded, ["rm", "-rf", "/etc"], "secret")
    assert fake.ansible_calls == []


def test_a_secret_goes_on_stdin_as_a_template_never_into_the_command():
    fake = FakeHost()
    status_line = "HTTP/1.1 200 OK"
    fake.ansible = lambda module, args, **kw: (
        fake.ansible_calls.append((module, args, kw))
        or {"rc": 0, "stdout": "{}", "stderr": status_line}
    )
    hostcheck.http(
        hostcheck.ReadOnlyHost(fake),
        "GET",
        "http://127.0.0.1:8000/v1/models",
        secret_headers={"Authorization": "Bearer {{ llmhost_check_api_key }}"},
    )
    ((module, args, kwargs),) = fake.ansible_calls
    assert module == "ansible.builtin.command"
    assert kwargs["check"] is False  # the command module does nothing in check mode
    assert '"stdin": "Authorization: Bearer {{ llmhost_check_api_key }}"' in args
    assert "Bearer" not in " ".join(__import__("json").loads(args)["argv"])
    assert fake.ran == []
