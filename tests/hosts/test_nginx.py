"""nginx on the serving hosts: a pure reverse proxy in front of the gateway."""

from __future__ import annotations

import ipaddress

import pytest
from hostcheck import IN_MOLECULE, assert_unit_hardened, assert_unit_healthy, http, openai_error

# Collected for every host; conftest.py keeps the hosts that run it
# (hostcheck.hosts_running).
SERVICE = "gateway"
testinfra_hosts = ["ansible://all"]


def test_nginx_is_active_enabled_and_stable(host):
    assert_unit_healthy(host, "nginx")


def test_nginx_unit_is_sandboxed(host):
    """The distribution's unit runs under the role's drop-in (9.6 without it, 2.5 with it)."""
    assert_unit_hardened(host, "nginx")


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


# Sources that every Linux host has without any setup (the kernel routes all of
# 127.0.0.0/8 to lo, so curl can bind to them) and that the default allow-list
# (127.0.0.1/32, ::1/128) leaves out: the refusal is checked from the served host
# itself, read-only, even where the host's own address is allowed (the demo host is
# also the monitoring host; the example inventory allows the serving network).
OUTSIDE_LOOPBACK_SOURCES = ("127.0.0.2", "127.255.255.254")


def _allowed_networks(host) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The allow-list in force, read from the configuration nginx runs with."""
    networks = []
    for line in host.file("/etc/nginx/nginx.conf").content_string.splitlines():
        words = line.split()
        if len(words) != 2 or words[0] != "allow":
            continue
        value = words[1].rstrip(";")
        if value == "all":
            networks += [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
        else:
            networks.append(ipaddress.ip_network(value, strict=False))
    return networks


def _is_allowed(address: str, networks) -> bool:
    ip = ipaddress.ip_address(address)
    # ipaddress compares across versions by integer value: keep to the same version.
    return any(ip.version == n.version and ip in n for n in networks)


def test_restricted_paths_are_refused_from_other_networks(host, hostvar, nginx_url):
    """/metrics and /admin/ answer to the allowed networks only (loopback by default);
    any other source gets nginx's 403 in OpenAI's shape."""
    allowed = _allowed_networks(host)
    own = [
        a for a in host.run("hostname -I").stdout.split() if ipaddress.ip_address(a).version == 4
    ]
    outside = [a for a in (*OUTSIDE_LOOPBACK_SOURCES, *own) if not _is_allowed(a, allowed)]
    if not outside:
        message = (
            f"every address this host can send from is allowed ({', '.join(map(str, allowed))}): "
            "the refusal needs a source outside the allow-list"
        )
        if IN_MOLECULE:
            pytest.fail(message)
        pytest.skip(message)
    listen = hostvar("nginx_listen_address", "0.0.0.0")
    target = "127.0.0.1" if listen in ("0.0.0.0", "*") else listen
    paths = [
        location + "usage" if location.endswith("/") else location
        for location in hostvar("nginx_restricted_locations", ["/metrics", "/admin/"])
    ]
    vllm_metrics = hostvar("nginx_vllm_metrics_location", "/metrics/vllm")
    if vllm_metrics:
        paths.append(vllm_metrics)
    for source in outside:
        for path in paths:
            status, _, body = http(host, "GET", nginx_url(path, target), source=source)
            assert status == 403, f"{path} answered {status} to {source}, outside the allow-list"
            error = openai_error(body)
            assert (error["type"], error["code"]) == ("permission_error", "forbidden"), error
    # The same path from an allowed source is served: the 403 above is the allow-list's.
    if _is_allowed("127.0.0.1", allowed):
        status, _, body = http(host, "GET", nginx_url("/metrics", target), source="127.0.0.1")
        assert status == 200, f"/metrics refused to 127.0.0.1, which is allowed: {body[:200]}"


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


@pytest.mark.molecule_only(reason="rotates the host's logs")
def test_rotated_access_log_is_reopened(host, hostvar, nginx_url):
    """logrotate's postrotate (USR1) reaches the sandboxed nginx: requests land in the new file."""
    log = hostvar("nginx_access_log", "/var/log/nginx/llmhost-access.json.log")
    http(host, "GET", nginx_url("/health"), headers={"X-Request-ID": "check-rotate-0"})
    result = host.run("logrotate -f /etc/logrotate.d/nginx")
    assert result.rc == 0, result.stderr
    assert host.file(f"{log}.1").exists, f"logrotate left no {log}.1"
    http(host, "GET", nginx_url("/health"), headers={"X-Request-ID": "check-rotate-1"})
    # nginx reopens its logs asynchronously after the signal: give it a moment.
    wait = f"for i in $(seq 50); do grep -q check-rotate-1 {log} && exit 0; sleep 0.1; done; exit 1"
    result = host.run(wait)
    assert result.rc == 0, f"nginx kept writing to the rotated file, not to {log}"
    assert host.file(log).user == "www-data"


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
