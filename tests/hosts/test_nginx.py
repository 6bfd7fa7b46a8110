"""nginx on the serving hosts: a pure reverse proxy in front of the gateway."""

from __future__ import annotations

import pytest
from conftest import assert_unit_healthy, http, openai_error

testinfra_hosts = ["ansible://gpu"]


def test_nginx_is_active_enabled_and_stable(host):
    assert_unit_healthy(host, "nginx")


def test_nginx_configuration_is_valid(host):
    # `nginx -t` only reads the configuration (it writes nothing).
    result = host.run("nginx -t")
    assert result.rc == 0, result.stderr


def test_stream_settings_are_in_force(host, hostvar):
    """What the streaming test cannot wait for: the long timeouts, no buffering either way."""
    # `nginx -T` prints the configuration nginx would load (it writes nothing).
    config = {line.strip() for line in host.run("nginx -T").stdout.splitlines()}
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        assert f"{name} {hostvar('nginx_' + name, 300)}s;" in config, name
    assert {"proxy_buffering off;", "proxy_request_buffering off;"} <= config
    assert "proxy_http_version 1.1;" in config  # keep-alive to the gateway


def test_nginx_listens_on_its_port(host, hostvar):
    address = hostvar("nginx_listen_address", "0.0.0.0")
    port = hostvar("nginx_listen_port", 8000)
    assert host.socket(f"tcp://{address}:{port}").is_listening


def test_paths_outside_the_allow_list_get_openai_404(host, nginx_url):
    for path in ("/", "/invocations", "/tokenize", "/v2/models", "/pause"):
        status, _, body = http(host, "GET", nginx_url(path))
        assert status == 404, path
        assert openai_error(body)["code"] == "not_found"


def test_restricted_paths_are_refused_from_other_networks(host, nginx_url):
    """/metrics and /admin/ answer to the allowed networks only (loopback by default)."""
    import ipaddress

    address = host.run("hostname -I").stdout.split()[0]
    # The allow-list in force, read from the configuration nginx runs with.
    config = host.file("/etc/nginx/nginx.conf").content_string
    allowed = {
        line.split()[1].rstrip(";")
        for line in config.splitlines()
        if line.strip().startswith("allow ")
    }
    if any(ipaddress.ip_address(address) in ipaddress.ip_network(n) for n in allowed):
        pytest.skip(f"{address} (this host) is itself allowed to the restricted paths")
    for path in ("/metrics", "/admin/usage"):
        status, _, body = http(host, "GET", nginx_url(path, address))
        assert status == 403, path
        assert openai_error(body)["type"] == "permission_error"


def test_access_log_is_json_with_upstream_time(host, hostvar, nginx_url):
    import json

    http(host, "GET", nginx_url("/health"), headers={"X-Request-ID": "check-log-1"})
    log = hostvar("nginx_access_log", "/var/log/nginx/llmhost-access.json.log")
    lines = host.run(f"tail -n 50 {log}").stdout.splitlines()
    records = [json.loads(line) for line in lines if "check-log-1" in line]
    assert records, "request id not found in the access log"
    record = records[-1]
    assert record["uri"] == "/health"
    assert isinstance(record["request_time"], (int, float))
    assert record["upstream_response_time"] != ""


# Run with the host's python3 (Ansible needs it there anyway): the certificate
# nginx serves on its port, compared with the first one of the file it was given.
SERVED_CERTIFICATE = """
import json, ssl, sys
port, path = int(sys.argv[1]), sys.argv[2]
served = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", port)))
text = open(path).read()
begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
first = text[text.index(begin) : text.index(end) + len(end)]
configured = ssl.PEM_cert_to_DER_cert(first)
print(json.dumps({"same": served == configured}))
"""


def test_nginx_serves_its_configured_certificate(host, hostvar):
    """With TLS on, nginx serves the certificate of nginx_tls_certificate (a rotated one
    that nginx has not loaded shows up here) and refuses plain HTTP on its port."""
    import json

    if not hostvar("nginx_tls_enabled", False):
        pytest.skip("TLS is off on this host (nginx_tls_enabled: false)")
    port = hostvar("nginx_listen_port", 8000)
    path = f"{hostvar('nginx_tls_dir', '/etc/nginx/tls')}/llmhost.crt"
    result = host.run("python3 -c %s %s %s", SERVED_CERTIFICATE, str(port), path)
    assert result.rc == 0, result.stderr
    assert json.loads(result.stdout)["same"], f"nginx serves another certificate than {path}"
    status, _, _ = http(host, "GET", f"http://127.0.0.1:{port}/health")
    assert status == 400  # nginx: "The plain HTTP request was sent to HTTPS port"
