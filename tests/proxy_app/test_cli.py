"""The command line: check-config, new-key, and refusing to start on a bad config."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from proxy_harness import checkout_env

from proxy_app.__main__ import main

BIN = Path(sys.executable).parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy_app", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **checkout_env()},
    )


def _config(tmp_path: Path, **overrides: object) -> Path:
    keys = tmp_path / "keys.json"
    if not keys.exists():
        keys.write_text(json.dumps({"keys": [{"key": "sk-abcdefgh12", "user": "u"}]}))
    conf = {"api_keys_file": "keys.json", "state_dir": str(tmp_path / "state"), **overrides}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def test_check_config_ok(tmp_path: Path) -> None:
    r = _run("check-config", "--config", str(_config(tmp_path, rate_limit={"qps": 5})))
    assert r.returncode == 0, r.stderr
    assert "1 keys" in r.stdout


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"vllm_port": "abc"}, "vllm_port"),
        ({"vllm_port": 70000}, "vllm_port"),
        ({"vllm_prot": 8000}, "vllm_prot"),
        ({"rate_limit": {"qps": -1}}, "rate_limit.qps"),
        ({"rate_limit": {"rps": 1}}, "rate_limit.rps"),
        ({"timeouts": {"connect": 0}}, "timeouts.connect"),
        ({"log_level": "loud"}, "log_level"),
        ({"trusted_proxies": ["not-a-net"]}, "trusted_proxies.0"),
        ({"redis_url": "http://x"}, "redis_url"),
    ],
)
def test_bad_config_names_the_field(
    tmp_path: Path, overrides: dict, field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(tmp_path, **overrides)
    # The gateway refuses to start: a real process, exit status 2.
    r = _run("--config", str(path))
    assert r.returncode == 2
    assert field in r.stderr, r.stderr
    # check-config says the same (in this process: a second interpreter per case doubled
    # these tests' time; test_check_config_ok and others run it as a process).
    assert main(["check-config", "--config", str(path)]) == 2
    assert field in capsys.readouterr().err


def test_bad_keys_file_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / "keys.json").write_text('{"keys": [{"key": "sk-abcdefgh12"}]}')
    r = _run("--config", str(_config(tmp_path)))
    assert r.returncode == 2 and "keys.0.user" in r.stderr


def test_missing_keys_file(tmp_path: Path) -> None:
    path = _config(tmp_path, api_keys_file="nope.json")
    r = _run("check-config", "--config", str(path))
    assert r.returncode == 2 and "nope.json" in r.stderr


def test_new_key(tmp_path: Path) -> None:
    r = _run("new-key", "--json")
    assert r.returncode == 0
    out = json.loads(r.stdout)
    assert out["key"].startswith("sk-") and len(out["key"]) > 40
    assert out["key_sha256"] == hashlib.sha256(out["key"].encode()).hexdigest()
    # The printed hash works as a keys file entry.
    (tmp_path / "keys.json").write_text(
        json.dumps({"keys": [{"key_sha256": out["key_sha256"], "user": "u"}]})
    )
    assert _run("check-config", "--config", str(_config(tmp_path))).returncode == 0


def test_new_keys_differ(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["new-key"]) == 0
    first = capsys.readouterr().out
    assert main(["new-key"]) == 0
    assert "sk-" in first and capsys.readouterr().out != first


def test_console_script(tmp_path: Path) -> None:
    r = subprocess.run(
        [str(BIN / "llm-proxy"), "check-config", "--config", str(_config(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **checkout_env()},
    )
    assert r.returncode == 0, r.stderr


def test_shipped_examples_are_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "proxy_app" / "config.example.yaml"
    r = _run("check-config", "--config", str(example))
    assert r.returncode == 0, r.stderr


def test_check_keys_refuses_a_duplicate_key(tmp_path: Path) -> None:
    """`check-keys` is what Ansible runs before a keys file replaces the one in force."""
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"keys": [{"key": "sk-abcdefgh12", "user": "u"}]}))
    r = _run("check-keys", str(good))
    assert r.returncode == 0, r.stderr
    assert "1 keys" in r.stdout

    digest = hashlib.sha256(b"sk-abcdefgh12").hexdigest()
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "keys": [
                    {"key": "sk-abcdefgh12", "user": "u"},
                    {"key_sha256": digest, "user": "v"},
                ]
            }
        )
    )
    r = _run("check-keys", str(bad))
    assert r.returncode == 2
    assert "bad.json" in r.stderr
    assert "duplicate" in r.stderr.lower()
