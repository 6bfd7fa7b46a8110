"""roles/common/files/llmhost-model: a model fetched from a mirror over real HTTP (a server in
this process serving a directory, with Range requests as nginx answers them), verified
against its SHA256SUMS, resumed, and not read again when nothing changed.

The server counts the bytes it sends per file and can cut a file's answer once: what the
fetch transferred is the server's count, not the tool's own word.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.machinery
import importlib.util
import json
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from standin_hub import COMMIT, REPO, Hub

TOOL = Path(__file__).resolve().parents[2] / "roles" / "common" / "files" / "llmhost-model"


def _tool() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("llmhost_model", str(TOOL))
    spec = importlib.util.spec_from_loader("llmhost_model", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


model_tool = _tool()


class Mirror:
    """A directory served over HTTP with Range support; bytes sent counted per file; a file's
    next answer cut after ``cut[path]`` bytes, once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sent: Counter[str] = Counter()
        self.cut: dict[str, int] = {}
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _file(self) -> tuple[str, Path] | None:
                rel = self.path.lstrip("/")
                f = mirror.root / rel
                return (rel, f) if f.is_file() else None

            def do_HEAD(self) -> None:
                found = self._file()
                if found is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(found[1].stat().st_size))
                self.end_headers()

            def do_GET(self) -> None:
                found = self._file()
                if found is None:
                    self.send_error(404)
                    return
                rel, f = found
                data = f.read_bytes()
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if m:
                    start = int(m.group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = mirror.cut.pop(rel, None)
                if cut is not None:
                    body = body[:cut]
                mirror.sent[rel] += len(body)  # before the client can have it all
                self.wfile.write(body)
                if cut is not None:
                    self.close_connection = True

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, model: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{model}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _model(d: Path, shards: int = 3, size: int = 256 * 1024) -> None:
    """A synthetic model: random shards and the small JSON files; its SHA256SUMS."""
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"architectures": ["Tiny"]}')
    (d / "tokenizer").mkdir()
    (d / "tokenizer" / "tokenizer.json").write_text("{}")
    for i in range(shards):
        (d / f"model-{i:05d}.safetensors").write_bytes(os.urandom(size))
    assert model_tool.write_manifest(d) == shards + 2


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    m = Mirror(tmp_path / "mirror")
    _model(tmp_path / "mirror" / "tiny")
    yield m
    m.close()


def _fetch(mirror: Mirror, dest: Path, **kw: object) -> dict:
    return model_tool.fetch(
        mirror.url("tiny"), dest, kw.get("jobs", 3), kw.get("margin", 0), 10, kw.get("free")
    )


def _same(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files = [f for f in files if f.name != model_tool.STATE]
    return files == sorted(
        p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != model_tool.STATE
    ) and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_a_model_is_fetched_whole_then_not_read_again(mirror: Mirror, tmp_path: Path) -> None:
    dest = tmp_path / "host" / "tiny"
    out = _fetch(mirror, dest)
    assert out["changed"] is True and out["files"] == 5
    assert _same(mirror.root / "tiny", dest)
    assert (
        out["bytes_transferred"]
        == sum(f.stat().st_size for f in (mirror.root / "tiny").rglob("*") if f.is_file())
        - (mirror.root / "tiny" / "SHA256SUMS").stat().st_size
    )
    # Nothing changed: the manifest only, no model byte, and quickly (sizes and times).
    before = sum(mirror.sent.values())
    t0 = time.monotonic()
    again = _fetch(mirror, dest)
    assert again == {"changed": False, "files": 5}
    assert (
        sum(mirror.sent.values()) - before == (mirror.root / "tiny" / "SHA256SUMS").stat().st_size
    )
    assert time.monotonic() - t0 < 5
    assert not dest.with_name("tiny.staging").exists()


def test_a_changed_manifest_fetches_only_the_files_that_differ(
    mirror: Mirror, tmp_path: Path
) -> None:
    dest = tmp_path / "host" / "tiny"
    _fetch(mirror, dest)
    shard = mirror.root / "tiny" / "model-00001.safetensors"
    shard.write_bytes(os.urandom(100_000))
    model_tool.write_manifest(mirror.root / "tiny")
    mirror.sent.clear()
    out = _fetch(mirror, dest)
    assert out["changed"] is True and out["fetched"] == ["model-00001.safetensors"]
    assert mirror.sent["tiny/model-00001.safetensors"] == 100_000
    assert [k for k in mirror.sent if k.endswith(".safetensors")] == [
        "tiny/model-00001.safetensors"
    ]
    assert _same(mirror.root / "tiny", dest)


def test_a_corrupted_byte_fails_naming_the_file_and_leaves_the_model_in_place(
    mirror: Mirror, tmp_path: Path
) -> None:
    dest = tmp_path / "host" / "tiny"
    _fetch(mirror, dest)
    serving = {p: p.read_bytes() for p in dest.rglob("*.safetensors")}
    # The mirror's shard changes, and its manifest says so, but one byte is then corrupted.
    shard = mirror.root / "tiny" / "model-00002.safetensors"
    shard.write_bytes(os.urandom(50_000))
    model_tool.write_manifest(mirror.root / "tiny")
    data = bytearray(shard.read_bytes())
    data[1234] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(model_tool.Refused, match=r"model-00002\.safetensors: sha256 .* does not"):
        _fetch(mirror, dest)
    assert {p: p.read_bytes() for p in dest.rglob("*.safetensors")} == serving


def test_a_cut_download_resumes_where_it_stopped(mirror: Mirror, tmp_path: Path) -> None:
    dest = tmp_path / "host" / "tiny"
    size = (mirror.root / "tiny" / "model-00000.safetensors").stat().st_size
    mirror.cut["tiny/model-00000.safetensors"] = size // 2
    with pytest.raises(model_tool.Refused, match=f"ended after {size // 2} of {size} bytes"):
        _fetch(mirror, dest, jobs=1)
    assert not dest.exists()
    assert mirror.sent["tiny/model-00000.safetensors"] == size // 2
    mirror.sent.clear()
    out = _fetch(mirror, dest)
    assert out["changed"] is True
    # The second half only: a Range request, not a restart.
    assert mirror.sent["tiny/model-00000.safetensors"] == size - size // 2
    assert _same(mirror.root / "tiny", dest)


def test_a_disk_without_room_is_refused_before_any_transfer(mirror: Mirror, tmp_path: Path) -> None:
    dest = tmp_path / "host" / "tiny"
    with pytest.raises(model_tool.Refused, match=r"bytes needed .* 1000 free") as e:
        _fetch(mirror, dest, free=1000)
    assert str(tmp_path / "host" / "tiny.staging") in str(e.value)
    assert not any(k.endswith(".safetensors") for k in mirror.sent)


def test_the_cli_prints_json_and_fails_with_the_reason(
    mirror: Mirror, tmp_path: Path, capsys
) -> None:
    dest = tmp_path / "host" / "tiny"
    assert (
        model_tool.main(
            ["fetch", "--url", mirror.url("tiny"), "--dest", str(dest), "--margin", "0"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["changed"] is True
    assert model_tool.main(["fetch", "--url", mirror.url("nothing"), "--dest", str(dest)]) == 1
    assert "nothing/SHA256SUMS" in capsys.readouterr().err


@pytest.mark.parametrize(
    "line",
    ["abc  model.safetensors", f"{'0' * 64}  ../etc/passwd", f"{'0' * 64}  /etc/passwd", ""],
)
def test_a_manifest_naming_a_path_outside_the_model_is_refused(line: str) -> None:
    with pytest.raises(model_tool.Refused):
        model_tool.parse_manifest(line)


def test_the_manifest_is_sha256sums_format(tmp_path: Path) -> None:
    d = tmp_path / "m"
    _model(d, shards=1, size=10)
    lines = (d / "SHA256SUMS").read_text().splitlines()
    digest = hashlib.sha256((d / "config.json").read_bytes()).hexdigest()
    assert f"{digest}  config.json" in lines
    assert "  tokenizer/tokenizer.json" in (d / "SHA256SUMS").read_text()


@pytest.fixture
def hub() -> Iterator[Hub]:
    files = {
        "config.json": b'{"architectures": ["TinyChat"]}',
        "tokenizer/tokenizer.json": b"{}",
        **{f"model-{i:05d}-of-00002.safetensors": os.urandom(200 * 1024) for i in (1, 2)},
    }
    h = Hub(files)
    yield h
    h.close()


def _from_hub(hub: Hub, dest: Path, token: str | None = None) -> dict:
    return model_tool.hub(hub.endpoint, REPO, COMMIT, dest, 2, 0, 10, token)


def test_a_hub_model_lands_on_the_mirror_with_the_hubs_own_hashes(hub: Hub, tmp_path: Path) -> None:
    on_mirror = tmp_path / "mirror" / "tiny"
    out = _from_hub(hub, on_mirror)
    assert out["changed"] and out["commit"] == COMMIT
    assert out["bytes_transferred"] == sum(len(d) for d in hub.files.values())
    for path, data in hub.files.items():
        assert (on_mirror / path).read_bytes() == data
    # The manifest is the hub's sha256 for the LFS files (and the sha256 of the small files,
    # whose bytes matched the hub's git blob id).
    manifest = model_tool.parse_manifest((on_mirror / "SHA256SUMS").read_text())
    for entry in hub.siblings():
        if "lfs" in entry:
            assert manifest[entry["rfilename"]] == entry["lfs"]["sha256"]
    assert set(manifest) == set(hub.files)
    # Once there, a re-run asks the hub for the list only.
    hub.sent.clear()
    again = _from_hub(hub, on_mirror)
    assert again == {"changed": False, "files": 4, "commit": COMMIT}
    assert sum(hub.sent.values()) == 0
    # The gpu hosts fetch it from the mirror, checked against those hashes.
    mirror = Mirror(tmp_path / "mirror")
    try:
        assert _fetch(mirror, tmp_path / "gpu" / "tiny")["changed"]
    finally:
        mirror.close()
    assert all((tmp_path / "gpu" / "tiny" / p).read_bytes() == d for p, d in hub.files.items())


@pytest.mark.parametrize(
    ("path", "kind"),
    [("model-00002-of-00002.safetensors", "sha256"), ("config.json", "git blob")],
)
def test_bytes_unlike_the_hubs_hash_are_refused_naming_the_file(
    hub: Hub, tmp_path: Path, path: str, kind: str
) -> None:
    data = bytearray(hub.files[path])
    data[len(data) // 2] ^= 1
    hub.served[path] = bytes(data)
    with pytest.raises(model_tool.Refused, match=rf"^{path}: {kind} [0-9a-f]+ does not match"):
        _from_hub(hub, tmp_path / "mirror" / "tiny")
    assert not (tmp_path / "mirror" / "tiny").exists()
    # Once the hub gives the right bytes, the files that were fine are not fetched again.
    del hub.served[path]
    hub.sent.clear()
    assert _from_hub(hub, tmp_path / "mirror" / "tiny")["changed"]
    assert set(hub.sent) == {path}


def test_a_commit_the_hub_does_not_confirm_is_refused(hub: Hub, tmp_path: Path) -> None:
    hub.answer_commit = "f" * 40
    with pytest.raises(model_tool.Refused, match=f"the hub answered commit 'f{{40}}' for {COMMIT}"):
        _from_hub(hub, tmp_path / "m")


def test_a_gated_model_needs_its_token_from_a_file(hub: Hub, tmp_path: Path, capsys) -> None:
    hub.token = secret = "hf_" + os.urandom(8).hex()
    args = ["hub", "--endpoint", hub.endpoint, "--repo", REPO, "--revision", COMMIT]
    args += ["--dest", str(tmp_path / "m"), "--margin", "0"]
    assert model_tool.main(args) == 1
    assert "401" in capsys.readouterr().err
    token = tmp_path / "token"
    token.write_text(secret + "\n")
    assert model_tool.main([*args, "--token-file", str(token)]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["changed"] is True
    assert secret not in out.out + out.err
