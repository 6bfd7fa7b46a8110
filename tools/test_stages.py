#!/usr/bin/env python3
"""`make test`'s driver: runs the suite's stages, times them, and names what failed last.

    python3 tools/test_stages.py [--stages a,b+c,...]

Each stage is a make target run with its output streamed as it comes and kept in
.cache/test-results/<stage>.log. Every pytest run writes a JUnit file there (PYTEST_ADDOPTS)
and prints its slowest tests; Molecule's Ansible runs print their tasks' timings (the
profile_tasks callback, in each scenario's molecule.yml). A failed stage does not stop the
run (but for setup, which every other stage needs): one run names every failure.

Last in the output, since CI shows only the tail of a run: a table of the stages (seconds,
load average at the start, result), then, for each failed stage, its failed tests with their
assertion, or the failure lines of its Ansible run. The table goes to
.cache/test-results/stages.json and, when every stage passed, to tests/stages.json, from
which tools/readme_figures.py renders the README's test-time figure.

The stages of a group (``a+b``) run side by side, each with its output held back and printed
whole when it ends (as make's --output-sync does): for stages that do not compete for the CPU.

Standard library only: it runs before the virtualenv exists (its first stage makes it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / ".cache" / "test-results"
RECORD = REPO / "tests" / "stages.json"

# name -> command; the order is make test's.
STAGES: dict[str, list[str]] = {
    "setup": ["make", "setup"],
    "lint": ["make", "lint"],
    "test-tools": ["make", "test-tools"],
    "test-rules": ["make", "test-rules"],
    "test-proxy": ["make", "test-proxy"],
    "molecule-nginx": ["make", "molecule", "SCENARIO=nginx"],
    "molecule-stack": ["make", "molecule", "SCENARIO=stack"],
    "molecule-cluster": ["make", "molecule", "SCENARIO=cluster"],
    "readme-figures": ["make", "readme-figures"],
}
DEFAULT = (
    "setup,lint+test-tools+test-rules,test-proxy,molecule-nginx,molecule-stack,"
    "molecule-cluster,readme-figures"
)
# Nothing runs after these fail: every later stage needs them.
PREREQUISITES = {"setup"}
# Molecule's line as it starts an action of its sequence ("stack ➜ converge: Executing").
_MOLECULE_STEP = re.compile(
    rb"\xe2\x9e\x9c\s*(?:\x1b\[[0-9;]*m)*(\w+)(?:\x1b\[[0-9;]*m)*: (?:\x1b\[[0-9;]*m)*Executing"
    rb"(?:\x1b\[[0-9;]*m)*\s*$"
)
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
_FRAME = re.compile(r"^\s*│\s?")
# An Ansible line that says what failed (a task, a host, Molecule's idempotence check).
_ANSIBLE_FAILURE = re.compile(
    r"^(fatal: \[|failed: \[|ERROR|CRITICAL|.*Idempotence test failed|.*unreachable=[1-9])"
)


@dataclass
class Stage:
    name: str
    command: list[str]
    seconds: float = 0.0
    load_start: float = 0.0
    rc: int | None = None
    log: Path = field(default_factory=Path)
    # A Molecule scenario's actions (create, converge, verify...): [name, seconds].
    steps: list[list] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.rc == 0


def _env(stage: Stage) -> dict[str, str]:
    env = dict(os.environ)
    junit = RESULTS / f"{stage.name}.xml"
    junit.unlink(missing_ok=True)
    # Every pytest run of the stage (the last one's file wins, so Molecule's verify is the one
    # kept for a scenario: its tests are what can fail there).
    # Last, so that they win over options from the environment.
    env["PYTEST_ADDOPTS"] = env.get("PYTEST_ADDOPTS", "") + f" --junitxml={junit} --durations=20"
    return env


def run(stage: Stage, echo: bool) -> None:
    """Run one stage; its output goes to its log, and to stdout as it comes when ``echo``."""
    stage.log = RESULTS / f"{stage.name}.log"
    stage.load_start = os.getloadavg()[0]
    start = time.monotonic()
    with stage.log.open("wb") as log:
        proc = subprocess.Popen(
            stage.command, cwd=REPO, env=_env(stage), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            step = _MOLECULE_STEP.search(line)
            if step:
                stage.steps.append([step.group(1).decode(), time.monotonic() - start])
            if echo:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
        stage.rc = proc.wait()
    stage.seconds = time.monotonic() - start
    # Each action lasts until the next one starts (the last one until the stage ends).
    ends = [t for _, t in stage.steps[1:]] + [stage.seconds] * bool(stage.steps)
    stage.steps = [[name, round(end - t)] for (name, t), end in zip(stage.steps, ends, strict=True)]


def run_group(stages: list[Stage]) -> None:
    if len(stages) == 1:
        _banner(stages[0])
        run(stages[0], echo=True)
        return
    for stage in stages:
        _banner(stage, "side by side with " + ", ".join(s.name for s in stages if s is not stage))
    threads = [threading.Thread(target=run, args=(s, False)) for s in stages]
    for t in threads:
        t.start()
    for stage, t in zip(stages, threads, strict=True):
        t.join()
        print(f"\n===== output of {stage.name} =====", flush=True)
        sys.stdout.buffer.write(stage.log.read_bytes())
        sys.stdout.flush()


def _banner(stage: Stage, note: str = "") -> None:
    when = datetime.now(UTC).strftime("%H:%M:%S")
    extra = f" ({note})" if note else ""
    print(f"\n===== {when} stage {stage.name}: {' '.join(stage.command)}{extra} =====", flush=True)


def failed_tests(junit: Path) -> list[str]:
    """'test id: first line of the failure' for each failed or erroring test in a JUnit file."""
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return []
    out = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            bad = case.find(kind)
            if bad is None:
                continue
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            message = (bad.get("message") or bad.text or "").strip().splitlines()
            first = message[0] if message else kind
            out.append(f"{name}: {first[:300]}")
    return out


def failure_lines(stage: Stage) -> list[str]:
    """What failed in a stage: its failed tests, else Ansible's failure lines, else its tail."""
    tests = failed_tests(RESULTS / f"{stage.name}.xml")
    if tests:
        return tests
    raw = stage.log.read_text(errors="replace").splitlines() if stage.log.exists() else []
    # Molecule draws a frame of colours and "│" around Ansible's output.
    text = [_FRAME.sub("", _COLOUR.sub("", line)) for line in raw]
    ansible = [line[:300] for line in text if _ANSIBLE_FAILURE.match(line)]
    return ansible[-12:] or [line[:300] for line in text[-12:]]


def report(stages: list[Stage], skipped: list[str], started: float) -> dict:
    total = time.monotonic() - started
    record = {
        "run": {
            "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "commit": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
            ).stdout.strip(),
        },
        "seconds": round(total),
        "passed": all(s.passed for s in stages) and not skipped,
        "stages": [
            {
                "name": s.name,
                "seconds": round(s.seconds),
                "load_average_start": round(s.load_start, 2),
                "passed": s.passed,
                **({"steps": dict(_numbered(s.steps))} if s.steps else {}),
            }
            for s in stages
        ],
        "skipped": skipped,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stages.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _numbered(steps: list[list]) -> list[tuple[str, int]]:
    """Molecule runs destroy twice: the second becomes "destroy 2"."""
    seen: dict[str, int] = {}
    out = []
    for name, seconds in steps:
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name} {seen[name]}", seconds))
    return out


def print_report(record: dict, stages: list[Stage]) -> None:
    print("\n===== make test: stages =====")
    print(f"{'stage':<18} {'seconds':>8} {'load at start':>14}  result")
    for s in record["stages"]:
        result = "passed" if s["passed"] else "FAILED"
        print(f"{s['name']:<18} {s['seconds']:>8} {s['load_average_start']:>14.2f}  {result}")
        for step, seconds in s.get("steps", {}).items():
            print(f"  {step:<16} {seconds:>8}")
    for name in record["skipped"]:
        print(f"{name:<18} {'-':>8} {'-':>14}  not run (a stage it needs failed)")
    print(f"{'total':<18} {record['seconds']:>8}   ({record['seconds'] / 60:.1f} min)")
    failed = [s for s in stages if not s.passed]
    if not failed:
        print("make test: every stage passed")
        return
    print("\n===== make test: what failed =====")
    for s in failed:
        log = s.log.relative_to(REPO) if s.log.is_relative_to(REPO) else s.log
        print(f"stage {s.name} (exit {s.rc}; its whole output: {log}):")
        for line in failure_lines(s):
            print(f"  FAILED {line}")
    print(f"make test: {len(failed)} stage(s) failed: {', '.join(s.name for s in failed)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=DEFAULT, help=f"default: {DEFAULT}")
    args = parser.parse_args(argv)
    groups = [[Stage(n, STAGES[n]) for n in g.split("+")] for g in args.stages.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    done: list[Stage] = []
    skipped: list[str] = []
    for group in groups:
        if any(s.name in PREREQUISITES and not s.passed for s in done):
            skipped += [s.name for s in group]
            continue
        run_group(group)
        done += group
    record = report(done, skipped, started)
    if record["passed"] and args.stages == DEFAULT:
        RECORD.write_text(json.dumps(record, indent=2) + "\n")
    print_report(record, done)
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
