"""tools/docs_check.py: the docs' links lead somewhere, the tests they name exist, and every
claim of docs/ names its test, links to its proof or says it is not tested."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import docs_check  # a tool of the repository, not a package

GOOD_README = """# project

What it is. Read on in [operating](docs/operating.md) and its
[limits](docs/operating.md#limits-and-keys-per-user), or [below](#layout).
The gateway's key reload is proven by `test_a_key_reloads_in_place` in
`tests/gateway/test_keys.py`, and test_a_roll_fails_naming_the_host (`tests/test_updates.py`
of the cluster scenario) proves the roll. Upstream docs: [vLLM](https://docs.vllm.ai/#top),
[mail](mailto:ops@example.org).

## Layout

```
[not a link](nowhere.md)
```
"""

OPERATING = """# Operating

## Limits and keys (per user)

Back to the [README](../README.md#project). Run `make test-gateway` for a quick loop.
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "tests" / "gateway").mkdir(parents=True)
    (tmp_path / "tests" / "gateway" / "test_keys.py").write_text(
        "import pytest\n\n\ndef test_a_key_reloads_in_place():\n    pass\n"
    )
    scenario = tmp_path / "molecule" / "cluster" / "tests"
    scenario.mkdir(parents=True)
    (scenario / "test_updates.py").write_text(
        "async def test_a_roll_fails_naming_the_host(host):\n    pass\n"
    )
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(GOOD_README)
    (tmp_path / "docs" / "operating.md").write_text(OPERATING)
    return tmp_path


def run(repo: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = docs_check.main(["--root", str(repo)])
    return code, capsys.readouterr().out.splitlines()


def test_the_repository_docs_pass(capsys):
    code, problems = run(docs_check.REPO, capsys)
    assert (code, problems) == (0, [])


def test_a_good_document_passes(repo, capsys):
    assert run(repo, capsys) == (0, [])


def test_a_link_to_a_missing_file_is_named_with_its_file_and_line(repo, capsys):
    page = repo / "docs" / "operating.md"
    page.write_text(OPERATING + "\nSee [scaling](scaling.md) and [it](../README.md).\n")

    code, problems = run(repo, capsys)

    assert code == 1
    assert problems == ["docs/operating.md:7: link to a missing file: scaling.md"]


def test_a_link_to_a_missing_heading_is_named(repo, capsys):
    readme = GOOD_README.replace("(#layout)", "(#lay-out)").replace(
        "#limits-and-keys-per-user", "#limits"
    )
    (repo / "README.md").write_text(readme)

    code, problems = run(repo, capsys)

    assert code == 1
    assert problems == [
        "README.md:4: link to a missing heading: docs/operating.md#limits",
        "README.md:4: link to a missing heading: #lay-out",
    ]


def test_a_link_whose_text_wraps_is_followed_and_named_at_its_line(repo, capsys):
    page = repo / "docs" / "operating.md"
    page.write_text(
        OPERATING
        + "\nTried with `make x`, it is in [the one\nafter](scaling.md#a-part) (not tested).\n"
    )

    code, problems = run(repo, capsys)

    assert code == 1
    assert problems == ["docs/operating.md:7: link to a missing file: scaling.md#a-part"]


def test_an_unknown_test_name_is_named(repo, capsys):
    (repo / "docs" / "operating.md").write_text(
        OPERATING + "\nProven by `test_a_key_reloads_in_place_twice`.\n"
    )

    code, problems = run(repo, capsys)

    assert code == 1
    assert problems == ["docs/operating.md:7: no test is named test_a_key_reloads_in_place_twice"]


def test_an_unknown_test_file_is_named_and_a_known_one_from_anywhere_passes(repo, capsys):
    (repo / "tools").mkdir()
    (repo / "tools" / "test_stages.py").write_text("")
    mentions = "`tools/test_stages.py` runs `tests/gateway/test_limits.py` and test_keys.py."
    (repo / "docs" / "operating.md").write_text(OPERATING + "\n" + mentions + "\n")

    code, problems = run(repo, capsys)

    assert code == 1
    assert problems == ["docs/operating.md:7: no such test file: tests/gateway/test_limits.py"]


def test_headings_get_githubs_anchors():
    text = "# A `make check`: run it!\n\n## Re-run\n\n## Re-run\n\n```\n# not a heading\n```\n"

    assert docs_check.anchors(text) == {"a-make-check-run-it", "re-run", "re-run-1"}


UNPROVEN = """
The gateway reloads its keys in place.
See [vLLM](https://docs.vllm.ai/) for the rest.

- Each key has its own limits,
  which hold across restarts.
- A key may expire (`test_a_key_reloads_in_place`).
"""


def test_a_docs_paragraph_or_item_that_proves_nothing_is_named_with_its_line(repo, capsys):
    (repo / "docs" / "operating.md").write_text(OPERATING + UNPROVEN)
    # The READMEs are not held to it.
    (repo / "README.md").write_text(GOOD_README + UNPROVEN)

    code, problems = run(repo, capsys)

    assert code == 1
    what = "proves nothing: name its test, link to its proof or say it is not tested"
    assert problems == [f"docs/operating.md:7: {what}", f"docs/operating.md:10: {what}"]


PROVEN = {
    "a test function": "Keys reload in place (test_a_key_reloads_in_place).",
    "a test file": "Keys reload in place (`tests/gateway/test_keys.py`).",
    "a scenario's test file": "A roll stops (`molecule/cluster/tests/test_updates.py`).",
    "a link to a heading": "Keys reload: [limits](#limits-and-keys-per-user).",
    "a link to another page": "As the [README](../README.md) says.",
    "a link to tests that are no Python": "Alerts: [rule tests](../roles/rules/tests/).",
    "not tested": "A reload under load is not\ntested (no load generator here).",
    "Not tested": "Not tested: real GPUs.",
    "not exercised": "- The driver install is not exercised.",
    "a heading": "## Keys reload in place",
    "a table": "| key | limit |\n|---|---|\n| alice | 5 |",
    "fenced code": "```\nkeys reload in place\n```",
    "an HTML comment": "<!-- keys reload in place -->",
    "a generated block": (
        "<!-- keys:begin: generated by tools/readme_figures.py -->\n\nA reload took 5 ms.\n\n"
        "- 5 ms\n\n<!-- keys:end -->"
    ),
    "numbered steps": "1. Edit the keys.\n2. Run it again:\n   the keys reload in place.",
    "an introduction": "The keys that reload:\n\n- [all of them](#limits-and-keys-per-user)",
}


@pytest.mark.parametrize("case", PROVEN)
def test_a_claim_with_its_proof_and_what_is_no_claim_pass(repo, capsys, case):
    (repo / "roles" / "rules" / "tests").mkdir(parents=True)
    (repo / "docs" / "operating.md").write_text(OPERATING + "\n" + PROVEN[case] + "\n")

    assert run(repo, capsys) == (0, [])
