"""Converges again with changed variables, on the TLS host (llmhost-nginx-tls, see
molecule.yml): its certificate verifies for the host's name, a new one is served
after a converge without a restart, and a key that does not match it, or an
nginx setting nginx refuses, changes nothing."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SCENARIO = Path(__file__).resolve().parent.parent
TLS_HOST = "llmhost-nginx-tls"
TLS_DIR = "/etc/nginx/tls"

testinfra_hosts = [f"ansible://{TLS_HOST}"]

# The certificate nginx serves on 127.0.0.1:8000, as PEM (host's python3).
SERVED = "import ssl; print(ssl.get_server_certificate(('127.0.0.1', 8000)))"


def _self_signed(name: str) -> tuple[str, str]:
    """A new self-signed certificate for `name` and 127.0.0.1, and its key (PEM)."""
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


def _same_certificate(a: str, b: str) -> bool:
    return x509.load_pem_x509_certificate(a.encode()) == x509.load_pem_x509_certificate(b.encode())


def _converge(
    extra_vars: dict | None = None, tags: str | None = None
) -> subprocess.CompletedProcess:
    command = [
        "ansible-playbook",
        "-i",
        os.environ["MOLECULE_INVENTORY_FILE"],
        str(SCENARIO / "converge.yml"),
        "--limit",
        TLS_HOST,
    ]
    if tags:
        command += ["--tags", tags]
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        if extra_vars:
            json.dump(extra_vars, f)
            f.flush()
            command += ["-e", f"@{f.name}"]
        return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


def _served(host) -> str:
    result = host.run("python3 -c %s", SERVED)
    assert result.rc == 0, result.stderr
    return result.stdout


def _nginx_pid(host) -> str:
    return host.run("systemctl show -p MainPID --value nginx").stdout.strip()


@pytest.fixture(scope="module")
def inventory_certificate(host):
    """The scenario's own certificate; put back after the tests that rotate it."""
    ephemeral = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"])
    certificate = (ephemeral / "tls" / "llmhost.crt").read_text()
    yield certificate
    run = _converge()
    assert run.returncode == 0, run.stdout[-3000:]
    assert _same_certificate(_served(host), certificate)


def test_tls_is_on_for_this_host(host):
    # Guards the scenario: without it every check here would run over plain HTTP.
    assert host.ansible.get_variables().get("nginx_tls_enabled") is True
    assert host.socket("tcp://0.0.0.0:8000").is_listening


def test_the_certificate_verifies_for_the_host_name(host):
    """A client that trusts the certificate and checks the name gets through."""
    result = host.run(
        "curl -sS -o /dev/null -w '%%{http_code}' --cacert %s --resolve %s https://%s:8000/health",
        f"{TLS_DIR}/llmhost.crt",
        f"{TLS_HOST}:8000:127.0.0.1",
        TLS_HOST,
    )
    assert result.rc == 0, result.stderr
    assert result.stdout == "200"


def test_the_key_is_readable_by_root_only(host):
    assert host.file(TLS_DIR).mode == 0o700
    key = host.file(f"{TLS_DIR}/llmhost.key")
    assert (key.user, key.group, key.mode) == ("root", "root", 0o600)


def test_a_new_certificate_is_served_after_a_converge_without_restart(host, inventory_certificate):
    assert _same_certificate(_served(host), inventory_certificate)
    certificate, key = _self_signed(TLS_HOST)
    pid_before = _nginx_pid(host)
    run = _converge({"nginx_tls_certificate": certificate, "nginx_tls_certificate_key": key})
    assert run.returncode == 0, run.stdout[-3000:]
    assert _same_certificate(_served(host), certificate)
    assert _nginx_pid(host) == pid_before, "nginx restarted (a reload was expected)"


# With --tags nginx_configure too: the preflight runs whichever phase a run selects.
@pytest.mark.parametrize("tags", [None, "nginx_configure"])
def test_a_key_that_does_not_match_changes_nothing(host, inventory_certificate, tags):
    files = [f"{TLS_DIR}/llmhost.crt", f"{TLS_DIR}/llmhost.key", "/etc/nginx/nginx.conf"]
    before = {path: host.file(path).sha256sum for path in files}
    served_before = _served(host)
    certificate, _ = _self_signed(TLS_HOST)
    _, other_key = _self_signed(TLS_HOST)
    run = _converge(
        {"nginx_tls_certificate": certificate, "nginx_tls_certificate_key": other_key}, tags
    )
    assert run.returncode != 0, "a certificate with somebody else's key was accepted"
    assert "is not the key of nginx_tls_certificate" in run.stdout + run.stderr, run.stderr[-3000:]
    assert "BEGIN PRIVATE KEY" not in run.stdout + run.stderr, "the key was printed"
    assert {path: host.file(path).sha256sum for path in files} == before
    assert _same_certificate(_served(host), served_before)


def test_a_setting_nginx_refuses_never_lands(host):
    """`nginx -t` checks the rendered nginx.conf before it replaces the running one."""
    before = host.file("/etc/nginx/nginx.conf").sha256sum
    pid_before = _nginx_pid(host)
    run = _converge({"nginx_client_max_body_size": "12 potatoes"})
    assert run.returncode != 0, "nginx.conf with an invalid client_max_body_size was accepted"
    output = run.stdout + run.stderr
    assert "Render nginx.conf" in output
    # nginx -t itself refused the rendered candidate (not some earlier check of the run):
    # "[emerg] invalid number of arguments in "client_max_body_size" directive ... test failed".
    assert "[emerg]" in output and 'in "client_max_body_size" directive' in output, output[-3000:]
    assert "test failed" in output, output[-3000:]
    assert host.file("/etc/nginx/nginx.conf").sha256sum == before
    assert _nginx_pid(host) == pid_before
    assert host.service("nginx").is_running
    result = host.run("curl -sk -o /dev/null -w '%{http_code}' https://127.0.0.1:8000/health")
    assert result.stdout == "200"
    # The run wrote the inventory's certificate back before it failed (the previous test had
    # rotated it): the handlers still ran (force_handlers), so nginx serves what is on disk.
    on_disk = host.file(f"{TLS_DIR}/llmhost.crt").content_string
    assert _same_certificate(_served(host), on_disk)
