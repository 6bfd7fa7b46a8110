#!/usr/bin/env python3
"""`make test`'s driver: runs the suite's stages, times them, and names what failed last.

    python3 tools/test_stages.py [--plan "a,b+c,d+&e,..."]

Each stage is a command (a make target), or, for the Molecule scenarios, the commands of a
scenario's sequence: ``<scenario>-up`` (destroy leftovers, create, prepare, converge, and
idempotence where the scenario has it) and ``<scenario>-check`` (verify, then destroy
whatever happened).
Its output is kept in .cache/test-results/<stage>.log. Every pytest run writes a JUnit file
there (PYTEST_ADDOPTS) and prints its slowest tests; Molecule's Ansible runs print their
tasks' timings (the profile_tasks callback, .config/molecule/config.yml). A failed stage does
not stop the run: one run names every failure (setup excepted: every stage needs it).

The plan is a list of groups run one after the other; the stages of a group (``a+b``) run
side by side, with their output held back and printed whole when each ends (as make's
--output-sync does). A stage marked ``&`` runs in the background: the plan goes on while it
runs, at the lowest priority (nice 19, and its test hosts at Docker's lowest CPU shares
until its check begins), so that it takes only CPU that the stages in front of it leave
idle; a stage that needs it (``<scenario>-check`` needs ``<scenario>-up``) waits for it.
That is how the next scenario's hosts are converged while the current one is verified.

Last in the output, since CI shows only the tail of a run: a table of the stages (seconds,
load average at the start, result) and the disk's free space (at the start, lowest, end),
then, for each failed stage, its failed tests with their assertion, or the failure lines of
its Ansible run; a stage whose log could not be written (a full disk) says so. The table goes to
.cache/test-results/stages.json and, when every stage of the default plan passed, to
tests/stages.json, from which tools/readme_figures.py then renders the README's test-time
figure.

Standard library only: it runs before the virtualenv exists (its first stage makes it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
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

Command = list[str]
VENV_BIN = REPO / ".venv" / "bin"
RENDER = [str(VENV_BIN / "python"), str(REPO / "tools" / "readme_figures.py")]
# How much of a failure's first line is printed: enough for an assertion's message to say
# why (a failed CI run's output is seen only by its tail).
FAILURE_CHARS = 800
BACKGROUND_CPU_SHARES = 128  # an eighth of Docker's default (1024): behind, not stopped


def _molecule(action: str, scenario: str) -> Command:
    return [str(VENV_BIN / "molecule"), action, "-s", scenario]


def _up(scenario: str, idempotence: bool) -> list[Command]:
    # `converge` runs Molecule's create and prepare first; the shares are set in between.
    create = [_molecule("destroy", scenario), _molecule("create", scenario)]
    steps = [*create, ["@cpu-shares", scenario], _molecule("converge", scenario)]
    return steps + [_molecule("idempotence", scenario)] * idempotence


def _check(scenario: str) -> list[Command]:
    return [["@cpu-shares", scenario], _molecule("verify", scenario)]


# name -> (commands, commands run last whatever happened before).
STAGES: dict[str, tuple[list[Command], list[Command]]] = {
    # The system packages first (python3-venv among them), then side by side where make may:
    # the gateway's venv beside the download and vLLM's env.
    "setup": ([["make", "deps"], ["make", "-j2", "--output-sync=target", "setup"]], []),
    "lint": ([["make", "lint"]], []),
    "test-tools": ([["make", "test-tools"]], []),
    "test-rules": ([["make", "test-rules"]], []),
    "test-proxy": ([["make", "test-proxy"]], []),
    "nginx": ([_molecule("test", "nginx")], []),
    # The stack scenario has no idempotence step: its first test re-runs site.yml, timed.
    "stack-up": (_up("stack", idempotence=False), []),
    "stack-check": (_check("stack"), [_molecule("destroy", "stack")]),
    "cluster-up": (_up("cluster", idempotence=True), []),
    "cluster-check": (_check("cluster"), [_molecule("destroy", "cluster")]),
    "readme-figures": ([["make", "readme-figures"]], []),
}
# Measured on this 2-core machine (the table's CPU busy): the stack's checks leave the CPU
# idle an eighth of the time, so the next scenario's converge runs behind them. Started
# earlier, behind the gateway's tests (a third idle), it slowed them by 28 s and the stack's
# checks by 22 s, and won nothing: fresh-clone runs of 2026-12-06, 1,851 s against 1,919 s.
DEFAULT = (
    "setup,lint+test-tools+test-rules+nginx+&stack-up,test-proxy,stack-check+&cluster-up,"
    "cluster-check,readme-figures"
)
NEEDS = {"stack-check": "stack-up", "cluster-check": "cluster-up"}
# Nothing runs after these fail: every later stage needs them.
PREREQUISITES = {"setup"}
# Molecule's line as it starts an action of its sequence ("stack ➜ converge: Executing").
_MOLECULE_STEP = re.compile(
    rb"\xe2\x9e\x9c\s*(?:\x1b\[[0-9;]*m)*(\w+)(?:\x1b\[[0-9;]*m)*: (?:\x1b\[[0-9;]*m)*Executing"
    rb"(?:\x1b\[[0-9;]*m)*\s*$"
)
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
_FRAME = re.compile(r"^\s*│\s?")
# An Ansible line that says what failed (a task, a host's recap, Molecule's idempotence check).
_ANSIBLE_FAILURE = re.compile(
    r"^(fatal: \[|failed: \[|ERROR!|.*Idempotence test failed"
    r"|\S+\s+: ok=.*(failed|unreachable)=[1-9])"
)


@dataclass
class Stage:
    name: str
    commands: list[Command]
    always: list[Command] = field(default_factory=list)
    background: bool = False
    seconds: float = 0.0
    load_start: float = 0.0
    # The machine's CPU time that was busy while the stage ran (all stages of the machine
    # together, /proc/stat): where it is low, the stage waits and something can run beside.
    cpu_busy: float | None = None
    rc: int | None = None
    skipped: bool = False
    beside: list[str] = field(default_factory=list)
    log: Path = field(default_factory=Path)
    # A Molecule scenario's actions (create, converge, verify...): [name, seconds].
    steps: list[list] = field(default_factory=list)
    # What went wrong around the stage's commands (its log could not be written: a full
    # disk), named with its failures at the end.
    error: str = ""

    @property
    def passed(self) -> bool:
        return self.rc == 0 and not self.error


def _env(stage: Stage) -> dict[str, str]:
    env = dict(os.environ)
    # What the Makefile exports, for a run started outside make.
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    env.setdefault("ANSIBLE_CONFIG", str(REPO / "ansible.cfg"))
    junit = RESULTS / f"{stage.name}.xml"
    # Every pytest run of the stage (the last one's file wins, so Molecule's verify is the one
    # kept for a scenario: its tests are what can fail there).
    # Last, so that they win over options from the environment.
    env["PYTEST_ADDOPTS"] = env.get("PYTEST_ADDOPTS", "") + f" --junitxml={junit} --durations=20"
    return env


def _cpu_shares(stage: Stage, scenario: str) -> int:
    """Lowest CPU shares for a background stage's test hosts, Docker's default otherwise."""
    shares = BACKGROUND_CPU_SHARES if stage.background else 1024
    names = subprocess.run(
        ["docker", "ps", "-q", "--filter", f"network=llmhost-molecule-{scenario}"],
        capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    if not names:
        return 0
    return subprocess.run(
        ["docker", "update", "--cpu-shares", str(shares), *names], capture_output=True, check=False
    ).returncode


def _run_command(stage: Stage, command: Command, log, echo: bool, start: float) -> int:
    if command[0] == "@cpu-shares":
        return _cpu_shares(stage, command[1])
    if stage.background:
        command = ["nice", "-n", "19", *command]
    proc = subprocess.Popen(
        command, cwd=REPO, env=_env(stage), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if not stage.error:
            try:
                log.write(line)
            except OSError as e:  # a full disk: the command goes on (its pipe drained)
                stage.error = f"its log could not be written: {e}"
        step = _MOLECULE_STEP.search(line)
        if step:
            stage.steps.append([step.group(1).decode(), time.monotonic() - start])
        if echo:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
    return proc.wait()


def run(stage: Stage, echo: bool) -> None:
    """Run one stage: its commands until one fails, then its ``always`` commands. Its output
    goes to its log, and to stdout as it comes when ``echo``."""
    stage.log = RESULTS / f"{stage.name}.log"
    (RESULTS / f"{stage.name}.xml").unlink(missing_ok=True)  # an earlier run's
    stage.load_start = os.getloadavg()[0]
    cpu_start = _cpu_times()
    start = time.monotonic()
    try:
        log = stage.log.open("wb", buffering=0)  # a write that fails fails at once
    except OSError as e:
        stage.error = f"its log could not be opened: {e}"
        log = open(os.devnull, "wb", buffering=0)  # noqa: SIM115 (closed below)
    with log:
        stage.rc = 0
        for command in [] if stage.skipped else stage.commands:
            stage.rc = _run_command(stage, command, log, echo, start)
            if stage.rc != 0:
                break
        for command in stage.always:
            _run_command(stage, command, log, echo, start)
    if stage.skipped:
        stage.rc = None
    stage.seconds = time.monotonic() - start
    stage.cpu_busy = _busy_share(cpu_start, _cpu_times())
    # Each action lasts until the next one starts (the last one until the stage ends).
    ends = [t for _, t in stage.steps[1:]] + [stage.seconds] * bool(stage.steps)
    stage.steps = [[name, round(end - t)] for (name, t), end in zip(stage.steps, ends, strict=True)]


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot; None where /proc/stat is not there."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _busy_share(start: tuple[int, int] | None, end: tuple[int, int] | None) -> float | None:
    if start is None or end is None or end[1] <= start[1]:
        return None
    return (end[0] - start[0]) / (end[1] - start[1])


def _print_output(stage: Stage) -> None:
    print(f"\n===== output of {stage.name} =====", flush=True)
    sys.stdout.buffer.write(stage.log.read_bytes())
    sys.stdout.flush()


def run_group(stages: list[Stage], background: dict[str, threading.Thread]) -> None:
    """Start the group's background stages, run the others, and return when those end."""
    now = [s for s in stages if not s.background]
    # Background stages of earlier groups still running run beside this group's too.
    running = [name for name, t in background.items() if t.is_alive()]
    for stage in stages:
        stage.beside = [s.name for s in stages if s is not stage] + running
        note = ("in the background, " if stage.background else "") + (
            "side by side with " + ", ".join(stage.beside) if stage.beside else ""
        )
        _banner(stage, note.rstrip(", "))
    for stage in stages:
        if stage.background:
            background[stage.name] = threading.Thread(target=run, args=(stage, False))
            background[stage.name].start()
    if len(now) == 1:
        run(now[0], echo=True)
        return
    threads = [threading.Thread(target=run, args=(s, False)) for s in now]
    for t in threads:
        t.start()
    for stage, t in zip(now, threads, strict=True):
        t.join()
        _print_output(stage)


def _banner(stage: Stage, note: str = "") -> None:
    when = datetime.now(UTC).strftime("%H:%M:%S")
    extra = f" ({note})" if note else ""
    what = " && ".join(" ".join(c) for c in stage.commands)
    print(f"\n===== {when} stage {stage.name}: {what}{extra} =====", flush=True)


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
            out.append(f"{name}: {first[:FAILURE_CHARS]}")
    return out


def failure_lines(stage: Stage) -> list[str]:
    """What failed in a stage: its failed tests, else Ansible's failure lines, else its tail."""
    tests = failed_tests(RESULTS / f"{stage.name}.xml")
    if tests or stage.error:  # a log that could not be written is no witness
        return tests
    raw = stage.log.read_text(errors="replace").splitlines() if stage.log.exists() else []
    # Molecule draws a frame of colours and "│" around Ansible's output.
    text = [_FRAME.sub("", _COLOUR.sub("", line)) for line in raw]
    ansible = [line[:FAILURE_CHARS] for line in text if _ANSIBLE_FAILURE.match(line)]
    return ansible[-12:] or [line[:FAILURE_CHARS] for line in text[-12:]]


def _disk_free_gib() -> float:
    return round(shutil.disk_usage(REPO).free / 2**30, 1)


class DiskWatch(threading.Thread):
    """The disk's free space at the start, at its lowest (read every few seconds) and at the
    end: a run that fills the disk fails in ways that name no test (CI once did)."""

    def __init__(self, every: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.every = every
        self.start_gib = self.lowest_gib = _disk_free_gib()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.lowest_gib = min(self.lowest_gib, _disk_free_gib())

    def result(self) -> dict[str, float]:
        self.stopped.set()
        end = _disk_free_gib()
        return {"start": self.start_gib, "lowest": min(self.lowest_gib, end), "end": end}


def report(stages: list[Stage], skipped: list[str], started: float, disk: dict) -> dict:
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
        "disk_free_gib": disk,
        "passed": all(s.passed for s in stages) and not skipped,
        "stages": [
            {
                "name": s.name,
                "seconds": round(s.seconds),
                "load_average_start": round(s.load_start, 2),
                **({"cpu_busy": round(s.cpu_busy, 2)} if s.cpu_busy is not None else {}),
                "passed": s.passed,
                **({"background": True} if s.background else {}),
                **({"beside": s.beside} if s.beside else {}),
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
    print(f"{'stage':<18} {'seconds':>8} {'load at start':>14} {'CPU busy':>9}  result")
    for s in record["stages"]:
        result = "passed" if s["passed"] else "FAILED"
        if s.get("background"):
            beside = f", beside {', '.join(s['beside'])}" if s.get("beside") else ""
            result += f" (in the background{beside})"
        elif s.get("beside"):
            result += f" (beside {', '.join(s['beside'])})"
        busy = f"{s['cpu_busy']:.0%}" if "cpu_busy" in s else "-"
        load = s["load_average_start"]
        print(f"{s['name']:<18} {s['seconds']:>8} {load:>14.2f} {busy:>9}  {result}")
        for step, seconds in s.get("steps", {}).items():
            if seconds:  # Molecule's actions with nothing to do (dependency, cleanup) take 0
                print(f"  {step:<16} {seconds:>8}")
    for name in record["skipped"]:
        print(f"{name:<18} {'-':>8} {'-':>14} {'-':>9}  not run (a stage it needs failed)")
    print(f"{'total':<18} {record['seconds']:>8}   ({record['seconds'] / 60:.1f} min)")
    disk = record["disk_free_gib"]
    print(
        f"disk free: {disk['start']} GiB at the start, {disk['lowest']} at the lowest,"
        f" {disk['end']} at the end"
    )
    failed = [s for s in stages if not s.passed]
    if not failed:
        print("make test: every stage passed")
        return
    print("\n===== make test: what failed =====")
    for s in failed:
        log = s.log.relative_to(REPO) if s.log.is_relative_to(REPO) else s.log
        print(f"stage {s.name} (exit {s.rc}; its whole output: {log}):")
        if s.error:
            print(f"  {s.error}")
        for line in failure_lines(s):
            print(f"  FAILED {line}")
    print(f"make test: {len(failed)} stage(s) failed: {', '.join(s.name for s in failed)}")


def _stage(token: str) -> Stage:
    name = token.lstrip("&")
    commands, always = STAGES[name]
    return Stage(name, commands, always, background=token.startswith("&"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default=DEFAULT, help=f"default: {DEFAULT}")
    args = parser.parse_args(argv)
    groups = [[_stage(t) for t in g.split("+")] for g in args.plan.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    disk = DiskWatch()
    disk.start()
    done: list[Stage] = []
    skipped: list[str] = []
    background: dict[str, threading.Thread] = {}
    by_name: dict[str, Stage] = {}
    for group in groups:
        if any(s.name in PREREQUISITES and not s.passed for s in done):
            skipped += [s.name for s in group]
            continue
        for stage in group:
            need = NEEDS.get(stage.name)
            if need in background:
                background.pop(need).join()
                _print_output(by_name[need])
            if need in by_name and not by_name[need].passed:
                stage.skipped = True  # its hosts are not there to check: only clean up
        run_group(group, background)
        done += group
        by_name.update((s.name, s) for s in group)
    for name, thread in background.items():
        thread.join()
        _print_output(by_name[name])
    skipped += [s.name for s in done if s.skipped]
    done = [s for s in done if not s.skipped]
    record = report(done, skipped, started, disk.result())
    rendered = True
    if record["passed"] and args.plan == DEFAULT:
        RECORD.write_text(json.dumps(record, indent=2) + "\n")
        # The README's test-time figure is rendered from RECORD, written only now.
        rendered = subprocess.run(RENDER).returncode == 0
    print_report(record, done)
    if not rendered:
        print("make test: tools/readme_figures.py failed on tests/stages.json (output above)")
        return 1
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
