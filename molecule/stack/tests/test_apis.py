"""The Responses API and Anthropic's Messages API through nginx and the gateway to the real
tiny model, with the official SDKs, from the controller (a client of the site, on the
scenario's network): text comes back, and the usage recorded for the key is what vLLM
reported. The gateway tests (tests/proxy_app/test_apis.py) cover the errors, limits and
clients that leave; this proves the deployed path (nginx's allow-list, the unit's config).
"""

from __future__ import annotations

import json
import subprocess

import anthropic
import openai
import pytest
from load import demo_key_text

STACK = "llmhost-stack"
testinfra_hosts = [f"ansible://{STACK}"]


@pytest.fixture(scope="module")
def base_url() -> str:
    """nginx on the stack host, at its address on the scenario's Docker network."""
    fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
    out = subprocess.run(
        ["docker", "inspect", "-f", fmt, STACK], capture_output=True, text=True, check=True
    )
    return f"http://{out.stdout.split()[0]}:8000"


def _usage(host) -> tuple[int, int]:
    """The demo user's prompt and completion tokens, from /admin/usage on the host (the
    admin key on curl's standard input, not its command line)."""
    result = host.ansible(
        "ansible.builtin.command",
        json.dumps(
            {
                "argv": ["curl", "-sf", "-H", "@-", "http://127.0.0.1:8000/admin/usage?user=demo"],
                "stdin": f"Authorization: Bearer {demo_key_text('admin-key')}",
            }
        ),
        check=False,
        become=True,
    )
    assert result.get("rc") == 0, result
    total = json.loads(result["stdout"])["data"][0]["total_usage"]
    return total["prompt_tokens"], total["completion_tokens"]


def _spent(before: tuple[int, int], after: tuple[int, int]) -> tuple[int, int]:
    return after[0] - before[0], after[1] - before[1]


def test_responses_through_nginx(host, base_url):
    client = openai.OpenAI(
        base_url=base_url + "/v1", api_key=demo_key_text("demo-key"), max_retries=0
    )
    before = _usage(host)
    exact = {"ignore_eos": True}  # the random model may end at any token otherwise
    resp = client.responses.create(
        model="tiny", input="Say hello", max_output_tokens=5, extra_body=exact
    )
    assert resp.usage is not None and resp.usage.output_tokens == 5
    assert _spent(before, _usage(host)) == (resp.usage.input_tokens, resp.usage.output_tokens)
    before = _usage(host)
    events = list(
        client.responses.create(
            model="tiny", input="Count", max_output_tokens=6, stream=True, extra_body=exact
        )
    )
    assert [e.type for e in events][-1] == "response.completed"
    usage = events[-1].response.usage
    assert usage is not None and usage.output_tokens == 6
    assert _spent(before, _usage(host)) == (usage.input_tokens, usage.output_tokens)


def test_anthropic_messages_through_nginx(host, base_url):
    client = anthropic.Anthropic(
        base_url=base_url, api_key=demo_key_text("demo-key"), max_retries=0
    )
    before = _usage(host)
    msg = client.messages.create(
        model="tiny", max_tokens=5, messages=[{"role": "user", "content": "Say hello"}]
    )
    assert msg.content and msg.content[0].type == "text"
    assert _spent(before, _usage(host)) == (msg.usage.input_tokens, msg.usage.output_tokens)
    before = _usage(host)
    with client.messages.stream(
        model="tiny", max_tokens=6, messages=[{"role": "user", "content": "Count"}]
    ) as stream:
        final = stream.get_final_message()
    assert 1 <= final.usage.output_tokens <= 6  # Anthropic's API has no ignore_eos
    assert _spent(before, _usage(host)) == (final.usage.input_tokens, final.usage.output_tokens)
    with pytest.raises(anthropic.AuthenticationError) as e:
        wrong = anthropic.Anthropic(base_url=base_url, api_key="sk-wrong-0123456789", max_retries=0)
        wrong.messages.create(
            model="tiny", max_tokens=1, messages=[{"role": "user", "content": "hi"}]
        )
    assert e.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
