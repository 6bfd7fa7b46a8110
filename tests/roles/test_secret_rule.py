"""The secret rule (roles/common/filter_plugins/secret_rule.py): at least 128 bits of
randomness by its estimate. What `llm-proxy new-key` prints and the demo's generated secrets
pass; what people type instead of a random key fails."""

from __future__ import annotations

import importlib.util
import secrets
import string
from pathlib import Path

import pytest

from proxy_app.keys import new_key

PLUGIN = Path(__file__).parents[2] / "roles/common/filter_plugins/secret_rule.py"
spec = importlib.util.spec_from_file_location("secret_rule", PLUGIN)
assert spec is not None and spec.loader is not None
rule = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rule)

ALNUM = string.ascii_letters + string.digits


def test_new_key_outputs_pass_with_a_wide_margin():
    bits = [rule.secret_bits(new_key()[0]) for _ in range(1000)]
    assert min(bits) >= 250, min(bits)
    assert all(rule.secret_problems(new_key()[0], "k") == [] for _ in range(100))


@pytest.mark.parametrize(
    ("make", "floor"),
    [
        # The demo inventories' lookup('password', chars=[ascii_letters, digits], length=N).
        (lambda: "".join(secrets.choice(ALNUM) for _ in range(32)), 155),
        (lambda: "sk-" + "".join(secrets.choice(ALNUM) for _ in range(40)), 200),
        # `openssl rand -hex 32`, and the length the roles' messages suggest.
        (lambda: secrets.token_hex(32), 260),
    ],
)
def test_random_secrets_of_the_documented_kinds_pass(make, floor):
    bits = [rule.secret_bits(make()) for _ in range(500)]
    assert min(bits) >= floor, min(bits)


@pytest.mark.parametrize(
    ("secret", "bits"),
    [
        ("sk-added-by-the-stack-scenario-0123456789", 87),  # words, separators, a sequence
        ("sk-" + "a" * 40, 10),  # one character repeated
        ("sk-" + "ab" * 20, 26),  # a pattern repeated
        ("sk-abcdefghijklmnop", 10),  # a sequence
        ("sk-correct-horse-battery-staple", 84),  # dictionary words
        ("sk-iloveyoumorethanwordscansayiloveyou", 95),  # words run together
        ("Password123" * 4, 32),  # a common password, repeated
        ("sk-admin-0123456789", 30),
    ],
)
def test_guessable_secrets_fail_with_their_estimate(secret, bits):
    assert round(rule.secret_bits(secret)) == bits
    (problem,) = rule.secret_problems(secret, "the_secret")
    assert problem.startswith(f"the_secret has about {bits} bits of randomness, fewer than 128")
    assert secret not in problem


def test_each_piece_is_counted_as_the_rule_says():
    # 36 = 26 lowercase + 10 digits: log2(36) per random character.
    per_char = rule.math.log2(36)
    assert rule.secret_bits("q7") == pytest.approx(2 * per_char)
    # A listed word: log2(number of words), one bit more with a capital letter.
    words = len(rule._words())
    assert rule.secret_bits("horse") == pytest.approx(rule.math.log2(words))
    assert rule.secret_bits("Horse") == pytest.approx(rule.math.log2(words) + 1)
    # A run of one character: log2(alphabet) + log2(length); a sequence one bit more.
    assert rule.secret_bits("zzzz") == pytest.approx(rule.math.log2(26) + 2)
    assert rule.secret_bits("6789") == pytest.approx(rule.math.log2(10) + 2 + 1)
    # The same separator again: 1 bit (alphabet 26 lowercase + 33 others).
    assert rule.secret_bits("q-x-") == pytest.approx(3 * rule.math.log2(59) + 1)
    # Text seen before: log2(position) + log2(length).
    assert rule.secret_bits("q7x2q7x2") == pytest.approx(4 * per_char + 2 + 2)


def test_a_placeholder_is_named_as_one():
    (problem,) = rule.secret_problems("sk-change-me-" + secrets.token_urlsafe(36), "k")
    assert "is a placeholder" in problem
