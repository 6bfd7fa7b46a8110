"""Pure functions of the hot path, checked without processes."""

from __future__ import annotations

import ipaddress
import json

import orjson
import pytest

from proxy_app.apis import APIS
from proxy_app.asgi import ClientAddress
from proxy_app.errors import ApiError, format_duration
from proxy_app.proxy import openai_error_body, parse_request
from proxy_app.sse import SseScanner


def _ev(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


CHUNK = {"choices": [{"delta": {"content": "a"}}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
STREAM = _ev(CHUNK) + _ev(CHUNK) + _ev(USAGE) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("keep_usage", [True, False])
@pytest.mark.parametrize("piece", [1, 7, 64, len(STREAM)])
def test_sse_scanner_any_split(keep_usage: bool, piece: int) -> None:
    s = SseScanner(keep_usage)
    out = b""
    for i in range(0, len(STREAM), piece):
        out += s.feed(STREAM[i : i + piece])
    assert s.done and s.usage == USAGE["usage"] and s.chunks == 2
    # [DONE] is held back until the caller has stored the usage.
    assert b"[DONE]" not in out
    out += s.rest()
    expected = STREAM if keep_usage else _ev(CHUNK) + _ev(CHUNK) + b"data: [DONE]\n\n"
    assert out == expected


def test_sse_scanner_forwards_unterminated_tail() -> None:
    s = SseScanner(False)
    assert s.feed(_ev(CHUNK) + b"data: {partial") == _ev(CHUNK)
    assert s.rest() == b"data: {partial"


def test_stream_options_injected_without_reserialising() -> None:
    body = (
        b'{"model": "m", "messages": [{"role": "user", "content": "\\u00e9"}], "stream": true}  \n'
    )
    req = parse_request(body, APIS["/v1/chat/completions"])
    assert req.stream and not req.wants_usage
    assert req.body.startswith(body.rstrip()[:-1])
    sent = orjson.loads(req.body)
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == orjson.loads(body)["messages"]


def test_non_stream_body_untouched() -> None:
    body = b'{"model": "m", "prompt": "x", "max_tokens": 3}'
    assert parse_request(body, APIS["/v1/completions"]).body is body


def test_parse_request_rejects_bool_as_int() -> None:
    with pytest.raises(ApiError) as e:
        parse_request(b'{"model": "m", "prompt": "x", "max_tokens": true}', APIS["/v1/completions"])
    assert e.value.param == "max_tokens"


def test_error_body_wrapping() -> None:
    ok = b'{"error": {"message": "m", "type": "t", "param": null, "code": 1}}'
    assert openai_error_body(400, ok) is ok
    wrapped = json.loads(openai_error_body(404, b'{"detail": "Not Found"}'))["error"]
    assert "Not Found" in wrapped["message"] and wrapped["code"] == "upstream_404"
    assert (
        json.loads(openai_error_body(502, b"<html>bad</html>"))["error"]["type"] == "server_error"
    )


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.02, "20ms"), (1.5, "1.5s"), (59.0, "59s"), (360, "6m0s")]
)
def test_reset_duration_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_client_address() -> None:
    ca = ClientAddress([ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8")])
    assert ca.resolve("127.0.0.1", b"1.2.3.4, 10.0.0.5") == "1.2.3.4"
    assert ca.resolve("192.0.2.1", b"1.2.3.4") == "192.0.2.1"
    assert ca.resolve("127.0.0.1", None) == "127.0.0.1"
    assert ca.resolve("127.0.0.1", b"garbage") == "127.0.0.1"


def test_the_gateways_exceptions_have_one_root_and_its_errors_one_maker() -> None:
    """Every exception class the gateway defines derives from errors.GatewayError (so
    ``except GatewayError`` catches what it raises on purpose, and a bug still reaches the
    500 handler); every ApiError a client is answered is built in errors.py."""
    import ast
    import importlib
    import inspect
    import pkgutil
    from pathlib import Path

    import proxy_app
    from proxy_app.errors import GatewayError

    roots = []
    for info in pkgutil.walk_packages(proxy_app.__path__, "proxy_app."):
        if info.name == "proxy_app.__main__":
            continue
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            mine = cls.__module__ == info.name and issubclass(cls, BaseException)
            if mine and not issubclass(cls, GatewayError):
                roots.append(f"{info.name}.{name}")
    assert roots == []
    built = []
    for path in Path(proxy_app.__file__).parent.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ApiError":
                built.append(f"{path.name}:{node.lineno}")
    assert built == []


def test_the_gateways_modules_import_each_other_without_a_circle() -> None:
    """The modules' run-time imports (``if TYPE_CHECKING`` ones aside) form no circle: each
    module can be read knowing only the ones below it."""
    import ast
    from graphlib import CycleError, TopologicalSorter
    from pathlib import Path

    import proxy_app

    root = Path(proxy_app.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        typing_only = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        deps = graph.setdefault(name, set())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level and id(node) not in typing_only:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                if node.module:
                    deps.add(".".join([*base, node.module]))
                else:  # from . import x
                    deps.update(".".join([*base, a.name]) for a in node.names)
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as e:
        raise AssertionError(f"import circle: {e.args[1]}") from None
    assert order.index("proxy_app.errors") < order.index("proxy_app.apis")
