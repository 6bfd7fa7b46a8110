"""The rule every machine secret of the bundle is held to (API keys, vLLM's key, Redis' password).

A secret must carry at least 128 bits of randomness, by this estimate (``secret_bits``), made
for what people type instead of a random key:

- an ``sk-`` prefix is not counted;
- the alphabet is the sum of the character classes the secret uses: 26 lowercase letters,
  26 uppercase, 10 digits, 33 other printable characters; a random character is worth
  log2(alphabet) bits;
- the secret is read left to right, taking at each position the longest of
  - a run of 3 or more of one character (``aaaa``): log2(alphabet) + log2(length) bits;
  - a run of 3 or more stepping by one (``0123``, ``fedc``): log2(alphabet) + log2(length) + 1;
  - a listed word of 3 letters or more, in any case (words.txt beside this file: about 12,800
    common English words, subtitles' words, passwords and names): log2(number of words)
    bits, 1 more when it has a capital letter;
  - 3 or more characters that already appeared, in that order, earlier in the secret
    (``abab...``, ``Password1Password1``): log2(position) + log2(length) bits;
  - else one character: log2(alphabet) bits, or 1 bit for a character that is neither
    letter nor digit and appeared before (the same separator again).

``llm-proxy new-key`` (48 random URL-safe characters, 288 bits) is estimated at about 300
(never under 250 in 3,000 draws), 32 random letters and digits at about 190 (never under 160),
``sk-added-by-the-stack-scenario-0123456789`` at 87, ``sk-correct-horse-battery-staple`` at 84,
``sk-`` and 40 ``a`` at 10 (tests/roles/test_secret_rule.py).
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Any

MIN_BITS = 128
PLACEHOLDER = "change-me"
# (is in the class, size of the class)
_CLASSES = (
    (str.islower, 26),
    (str.isupper, 26),
    (str.isdigit, 10),
    (lambda c: not c.isalnum(), 33),
)


@cache
def _words() -> frozenset[str]:
    text = (Path(__file__).parent / "words.txt").read_text(encoding="utf-8")
    return frozenset(w for w in text.split("\n") if w and not w.startswith("#"))


@cache
def _longest_word_len() -> int:
    return max(map(len, _words()))


def _run(body: str, i: int) -> tuple[int, bool]:
    """Length of the repeat or ±1 sequence starting at ``i`` (at least 1), and whether a
    sequence."""
    if i + 1 >= len(body):
        return 1, False
    step = ord(body[i + 1]) - ord(body[i])
    if step not in (-1, 0, 1):
        return 1, False
    j = i + 1
    while j < len(body) and ord(body[j]) - ord(body[j - 1]) == step:
        j += 1
    return j - i, step != 0


def _word(lower: str, i: int) -> int:
    """Length of the longest listed word starting at ``i`` (0: none)."""
    words = _words()
    for n in range(min(_longest_word_len(), len(lower) - i), 2, -1):
        if lower[i : i + n] in words:
            return n
    return 0


def _again(body: str, i: int) -> int:
    """Length of the longest text starting at ``i`` that appeared earlier (0: under 3)."""
    n = 0
    while i + n < len(body) and body[i : i + n + 1] in body[: i + n]:
        n += 1
    return n if n >= 3 else 0


def secret_bits(value: Any) -> float:
    """Estimated bits of randomness of ``value`` (the rule in this module's docstring)."""
    body = str(value).removeprefix("sk-")
    size = sum(n for member, n in _CLASSES if any(member(c) for c in body))
    per_char = math.log2(size) if size > 1 else 0.0
    word_bits = math.log2(len(_words()))
    lower = body.lower()
    seen: set[str] = set()
    bits = 0.0
    i = 0
    while i < len(body):
        run, sequence = _run(body, i)
        word = _word(lower, i)
        again = _again(body, i)
        if again > max(run, word):
            bits += math.log2(i) + math.log2(again)
            i += again
        elif run >= 3 and run >= word:
            bits += per_char + math.log2(run) + (1 if sequence else 0)
            i += run
        elif word:
            bits += word_bits + (1 if any(c.isupper() for c in body[i : i + word]) else 0)
            i += word
        else:
            c = body[i]
            bits += 1 if not c.isalnum() and c in seen else per_char
            seen.add(c)
            i += 1
    return bits


def secret_problems(value: Any, name: str) -> list[str]:
    """Why the secret named ``name`` is a placeholder or guessable ([]: it is fine); the
    messages name it, never show it."""
    value = str(value)
    if PLACEHOLDER in value.lower():
        return [f"{name} is a placeholder (it contains {PLACEHOLDER}): set a real one (vault)."]
    bits = secret_bits(value)
    if bits < MIN_BITS:
        return [
            f"{name} has about {bits:.0f} bits of randomness, fewer than {MIN_BITS} (the rule:"
            " roles/common/filter_plugins/secret_rule.py): make one with `llm-proxy new-key`"
            " or `openssl rand -hex 32`."
        ]
    return []


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"llmhost_secret_problems": secret_problems, "llmhost_secret_bits": secret_bits}
