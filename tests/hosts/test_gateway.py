"""The gateway on the serving hosts, and a real answer through nginx."""

from __future__ import annotations

import hashlib
import json

from hostcheck import (
    assert_unit_hardened,
    assert_unit_healthy,
    http,
    openai_error,
    run_with_stdin,
)

# Collected for every host; conftest.py keeps the hosts that run it
# (hostcheck.hosts_running).
SERVICE = "gateway"
testinfra_hosts = ["ansible://all"]


def test_gateway_is_active_enabled_and_stable(host):
    assert_unit_healthy(host, "llm-proxy")


def test_gateway_unit_is_sandboxed(host):
    assert_unit_hardened(host, "llm-proxy")


def test_gateway_listens_on_loopback_only(host, hostvar):
    port = hostvar("llm_proxy_port", 8001)
    assert host.socket(f"tcp://{hostvar('llm_proxy_host', '127.0.0.1')}:{port}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{port}").is_listening


def test_config_and_keys_files_are_private(host, hostvar):
    config_dir = hostvar("llm_proxy_config_dir", "/etc/llm-proxy")
    group = hostvar("llm_proxy_group", "llm-proxy")
    for name in ("config.yaml", "keys.json"):
        f = host.file(f"{config_dir}/{name}")
        assert f.user == "root", name
        assert f.group == group, name
        assert f.mode == 0o640, f"{f.path} has mode {f.mode:#o}, expected 0o640"


def test_no_plaintext_key_on_disk(host, hostvar):
    config_dir = hostvar("llm_proxy_config_dir", "/etc/llm-proxy")
    keys = json.loads(host.file(f"{config_dir}/keys.json").content_string)["keys"]
    assert keys
    for entry in keys:
        assert "key" not in entry, f"plaintext key for {entry.get('user')}"
        assert len(entry["key_sha256"]) == 64
    # The one plaintext key the checks know; without it the search below would pass unseen.
    check_key = hostvar("llmhost_check_api_key", "")
    assert check_key, "set llmhost_check_api_key in the inventory (a key the checks may use)"
    # The key is the pattern on grep's stdin, not on its command line (sudo logs those);
    # first, proof that it arrives there (else grep would search for nothing and pass).
    key = "{{ llmhost_check_api_key }}"
    _, digest, _ = run_with_stdin(host, ["sha256sum"], key)
    assert digest.split()[0] == hashlib.sha256(f"{check_key}\n".encode()).hexdigest()
    rc, found, errors = run_with_stdin(
        host, ["grep", "-rlF", "-f", "-", "/etc", "/var/lib/llm-proxy", "/opt/llm-proxy"], key
    )
    assert rc != 0 and found == "", f"plaintext key found in {found} {errors}"


def test_gateway_health_and_readiness(host, hostvar):
    port = hostvar("llm_proxy_port", 8001)
    status, _, _ = http(host, "GET", f"http://127.0.0.1:{port}/health")
    assert status == 200
    status, _, body = http(host, "GET", f"http://127.0.0.1:{port}/ready")
    assert status == 200, body


def test_a_bad_key_gets_401_through_nginx(host, nginx_url):
    status, _, body = http(
        host,
        "GET",
        nginx_url("/v1/models"),
        headers={"Authorization": "Bearer sk-not-a-key"},
    )
    assert status == 401
    assert openai_error(body)["code"] == "invalid_api_key"


def test_a_real_answer_through_nginx(host, hostvar, nginx_url):
    """The check key gets a generated answer from the model, through nginx and the gateway."""
    key = hostvar("llmhost_check_api_key", "")
    assert key, "set llmhost_check_api_key in the inventory (a key the checks may use)"
    model = hostvar("vllm_served_model_name")
    if not model:
        # A gateway-only host knows no vLLM variables: the first model the gateway lists.
        status, _, listed = http(
            host,
            "GET",
            nginx_url("/v1/models"),
            secret_headers={"Authorization": "Bearer {{ llmhost_check_api_key }}"},
        )
        assert status == 200, listed
        model = json.loads(listed)["data"][0]["id"]
    body = json.dumps(
        {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "Say hello"}]}
    )
    status, headers, answer = http(
        host,
        "POST",
        nginx_url("/v1/chat/completions"),
        secret_headers={"Authorization": "Bearer {{ llmhost_check_api_key }}"},
        body=body,
        timeout=120,
    )
    assert status == 200, answer
    parsed = json.loads(answer)
    assert parsed["usage"]["completion_tokens"] >= 1
    assert parsed["choices"][0]["message"]["role"] == "assistant"
    assert headers.get("x-request-id")
