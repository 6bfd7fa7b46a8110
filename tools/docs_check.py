"""Check the documentation's links, the tests it names and the proof of each claim of docs/.

    python tools/docs_check.py    # `make lint` runs it

Reads README.md, proxy_app/README.md and docs/*.md, and prints one line per problem
(`file:line: what`), exiting 1 when there is any:

- a relative Markdown link, `[text](path)` or `[text](path#anchor)` (its text may wrap onto
  the next line), whose path does not exist next to the file, or whose anchor (also a bare
  `[text](#anchor)`) is no heading of the target file by GitHub's rule (lower case,
  punctuation but hyphens and underscores dropped, spaces to hyphens, a repeated heading
  numbered `-1`, `-2`...); http(s) and mailto links are not followed;
- a test function named in the text (`test_...`, in backticks or not) that no
  `def test_...` or `async def test_...` under tests/ or molecule/ defines: a sentence that
  says which test proves it must name one that exists;
- a test file named in the text (`test_*.py`, `tests/....py`) that exists neither at that path
  from the repository's root nor as the end of a path under tests/ or molecule/ (the docs say
  `tests/test_limits.py` of a scenario's `molecule/cluster/tests/test_limits.py`);
- in docs/*.md only (the README is a map into docs/; the gateway's names its tests section by
  section), a paragraph or unordered list item that proves nothing: each must name a test (a
  `test_...` function or a test file, which the rules above check exist), link to what proves
  it (a Markdown page or heading, or a `tests/` folder or file of tests that are not Python,
  such as promtool's), or say plainly that it is "not tested" (or "not exercised"), so that
  every behavioural sentence has its proof, or says it has none, next to it. Not claims, and
  not checked: headings, tables, fenced code, HTML comment lines, the generated blocks between
  `<!-- NAME:begin` and `<!-- NAME:end -->` (their results file is their proof), ordered-list
  items (steps to follow) and a paragraph or item that ends with ":" (it introduces what
  follows). A paragraph is consecutive non-blank lines; a list item runs from its `- ` or `* `
  line to the next item, blank line or heading.

Links inside fenced code blocks and inline code are not links, and are not followed; test
names are checked everywhere, code included.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"`+[^`]*`+")
# [text](target) or [text](target "title"); images too. Nested brackets in the text are rare
# enough in these docs to leave out.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_TEST_FILE = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*test_\w+\.py|tests/[\w./-]+\.py)\b")
_TEST_NAME = re.compile(r"\btest_\w+")
_DEF = re.compile(r"^\s*(?:async\s+)?def\s+(test_\w+)\s*\(", re.M)
_GENERATED = re.compile(r"^<!--\s*[\w-]+:(begin|end)\b")
_ITEM = re.compile(r"^\s*(?:([-*])|\d+[.)])\s+")  # group 1: unordered
_NOT_TESTED = re.compile(r"\b[Nn]ot (?:tested|exercised)\b")


@dataclass(frozen=True)
class Problem:
    path: Path
    line: int
    what: str

    def render(self, root: Path) -> str:
        try:
            shown = self.path.relative_to(root)
        except ValueError:
            shown = self.path
        return f"{shown}:{self.line}: {self.what}"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but `-` and `_` dropped, spaces
    to hyphens (`Checking deployed hosts: `make check`` -> `checking-deployed-hosts-make-check`)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text, not its target
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def _lines_outside_code(text: str) -> Iterable[tuple[int, str]]:
    """(number, line) of every line that is not inside a fenced code block."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def anchors(text: str) -> set[str]:
    """Every anchor GitHub gives the headings of a Markdown text."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in _lines_outside_code(text):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def defined_tests(root: Path) -> set[str]:
    """The names of every test function under tests/ and molecule/."""
    names: set[str] = set()
    for tree in ("tests", "molecule"):
        for path in (root / tree).rglob("*.py"):
            names.update(_DEF.findall(path.read_text(errors="replace")))
    return names


def known_test_files(root: Path) -> list[str]:
    """Every Python file under tests/ and molecule/, as a path from the root."""
    return [
        path.relative_to(root).as_posix()
        for tree in ("tests", "molecule")
        for path in (root / tree).rglob("*.py")
    ]


def _file_exists(name: str, root: Path, files: list[str]) -> bool:
    if (root / name).is_file():
        return True
    return any(f == name or f.endswith("/" + name) for f in files)


def _links(text: str) -> Iterable[tuple[int, str]]:
    """(line, target) of every link outside code, a link whose text wraps onto the next line
    included: the text outside fences is read paragraph by paragraph, inline code blanked."""
    paragraphs: list[tuple[int, list[str]]] = []
    previous = 0
    for number, line in _lines_outside_code(text):
        if not line.strip():
            continue
        if number != previous + 1 or not paragraphs:
            paragraphs.append((number, []))
        paragraphs[-1][1].append(line)
        previous = number
    for first, lines in paragraphs:
        joined = "\n".join(lines)
        blanked = _INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), joined)
        for match in _LINK.finditer(blanked):
            yield first + blanked.count("\n", 0, match.start()), match.group(1)


def check_links(path: Path, text: str) -> list[Problem]:
    problems = []
    cache: dict[Path, set[str]] = {}
    for number, target in _links(text):
        if re.match(r"^(https?:|mailto:)", target, re.I):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(Problem(path, number, f"link to a missing file: {target}"))
            continue
        if not anchor:
            continue
        if linked.is_dir() or linked.suffix.lower() != ".md":
            problems.append(Problem(path, number, f"anchor into a non-Markdown file: {target}"))
            continue
        if linked not in cache:
            cache[linked] = anchors(text if linked == path else linked.read_text())
        if anchor not in cache[linked]:
            problems.append(Problem(path, number, f"link to a missing heading: {target}"))
    return problems


def check_tests(
    path: Path, text: str, root: Path, tests: set[str], files: list[str]
) -> list[Problem]:
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        for name in _TEST_FILE.findall(line):
            if not _file_exists(name, root, files):
                problems.append(Problem(path, number, f"no such test file: {name}"))
        for match in _TEST_NAME.finditer(line):
            name = match.group(0)
            if line[match.end() : match.end() + 3] == ".py":
                continue  # a file name, checked above
            if name not in tests:
                problems.append(Problem(path, number, f"no test is named {name}"))
    return problems


def claims(text: str) -> list[tuple[int, str]]:
    """(first line, text) of every paragraph and unordered list item, which state something;
    headings, tables, code, comments, generated blocks, numbered steps (instructions) and text
    that ends with ":" (it introduces what follows) do not."""
    blocks: list[tuple[int, bool, list[str]]] = []  # (first line, a numbered step?, lines)
    inside = fenced = generated = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced, inside = not fenced, False
            continue
        marker = _GENERATED.match(line)
        if marker and not fenced:
            generated = marker.group(1) == "begin"
        if (
            fenced
            or generated
            or not line.strip()
            or _HEADING.match(line)
            or line.lstrip().startswith(("|", "<!--"))
        ):
            inside = False  # ends the paragraph or item
            continue
        item = _ITEM.match(line)
        if item or not inside:
            blocks.append((number, bool(item and not item.group(1)), []))
            inside = True
        blocks[-1][2].append(line.strip())
    found = [(number, step, " ".join(lines)) for number, step, lines in blocks]
    return [(number, said) for number, step, said in found if not step and not said.endswith(":")]


def proven(text: str) -> bool:
    """Whether a claim names a test, links to what proves it (a page or heading, which says
    how, or tests that are no Python, such as promtool's rule tests), or says it is not
    tested."""
    if _TEST_NAME.search(text) or _TEST_FILE.search(text) or _NOT_TESTED.search(text):
        return True
    for target in _LINK.findall(_INLINE_CODE.sub("", text)):
        page = target.partition("#")[0]
        if re.match(r"^(https?|mailto):", page, re.I):
            continue
        if not page or page.endswith(".md") or "tests" in Path(page).parts:
            return True
    return False


def check_claims(path: Path, text: str) -> list[Problem]:
    what = "proves nothing: name its test, link to its proof or say it is not tested"
    return [Problem(path, number, what) for number, claim in claims(text) if not proven(claim)]


def documents(root: Path) -> list[Path]:
    docs = [root / "README.md", root / "proxy_app" / "README.md"]
    docs += sorted((root / "docs").glob("*.md"))
    return [d for d in docs if d.exists()]


def check(root: Path, paths: list[Path]) -> list[Problem]:
    tests = defined_tests(root)
    files = known_test_files(root)
    problems = []
    for path in paths:
        text = path.read_text()
        problems += check_links(path, text)
        problems += check_tests(path, text, root, tests, files)
        if path.parent == root / "docs":
            problems += check_claims(path, text)
    return sorted(problems, key=lambda p: (str(p.path), p.line))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", type=Path, default=REPO, help="repository root (tests/, molecule/, docs/)"
    )
    parser.add_argument(
        "paths", nargs="*", type=Path, help="Markdown files (default: the READMEs and docs/*.md)"
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    paths = [p.resolve() for p in args.paths] or documents(root)
    problems = check(root, paths)
    for problem in problems:
        print(problem.render(root))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
