"""tools/test_stages.py, make test's driver: stages timed, every stage run, failures named last.

The stages here are small commands of the test's own (a pytest run with a failing test, an
Ansible-like failure, a passing step), run by the driver as it runs make's targets.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAILING_TEST = """
def test_fine():
    assert True

def test_the_answer():
    answer = 41
    assert answer == 42, "the answer is off by one"
"""


@pytest.fixture
def driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("test_stages_tool", REPO / "tools/test_stages.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "RECORD", tmp_path / "stages.json")
    # Stands in for tools/readme_figures.py: it must find the run's record already written.
    record, rendered = str(tmp_path / "stages.json"), str(tmp_path / "rendered.json")
    render = f"import shutil; shutil.copy({record!r}, {rendered!r})"
    monkeypatch.setattr(module, "RENDER", [sys.executable, "-c", render])
    suite = tmp_path / "test_suite.py"
    suite.write_text(FAILING_TEST)
    py = sys.executable
    ansible_failure = (
        "print('TASK [x]'); print('fatal: [host1]: FAILED! => {\"msg\": \"no such unit\"}');"
        "raise SystemExit(2)"
    )
    marker = tmp_path / "hosts-up"
    monkeypatch.setattr(
        module,
        "STAGES",
        {
            "setup": ([[py, "-c", "print('ready')"]], []),
            "unit": (
                [[py, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)]],
                [[py, "-c", "print('cleaned up after the tests')"]],  # as a destroy does
            ),
            "deploy": ([[py, "-c", ansible_failure]], []),
            "lint": ([[py, "-c", "print('clean')"]], []),
            # A background stage: slow, and it says how nice it ran.
            "hosts-up": (
                [
                    [
                        py,
                        "-c",
                        f"import os, time; time.sleep(1); open({str(marker)!r}, 'w')"
                        ".write(str(os.nice(0)))",
                    ]
                ],
                [],
            ),
            "hosts-check": (
                [[py, "-c", f"import pathlib; assert pathlib.Path({str(marker)!r}).exists()"]],
                [[py, "-c", "print('hosts destroyed')"]],
            ),
        },
    )
    monkeypatch.setattr(module, "NEEDS", {"hosts-check": "hosts-up"})
    module.marker = marker
    return module


def test_every_stage_runs_and_the_failures_are_named_last(driver, capsys) -> None:
    rc = driver.main(["--plan", "setup,unit+lint,deploy"])
    out = capsys.readouterr().out
    assert rc == 1
    tail = out.splitlines()[-12:]
    text = "\n".join(tail)
    # The table, then what failed: the failed test with its assertion, the failed task.
    assert "test_the_answer: AssertionError: the answer is off by one" in text, text
    assert "FAILED fatal: [host1]: FAILED!" in text, text
    assert tail[-1] == "make test: 2 stage(s) failed: unit, deploy"
    assert "test_fine" not in text
    record = json.loads((driver.RESULTS / "stages.json").read_text())
    assert [s["name"] for s in record["stages"]] == ["setup", "unit", "lint", "deploy"]
    assert [s["passed"] for s in record["stages"]] == [True, False, True, False]
    assert all(s["seconds"] >= 0 and s["load_average_start"] >= 0 for s in record["stages"])
    assert not driver.RECORD.exists(), "a failed run is no figure for the README"


def test_a_passing_run_is_recorded_for_the_readme(driver, monkeypatch, capsys) -> None:
    monkeypatch.setattr(driver, "DEFAULT", "setup,lint")
    assert driver.main(["--plan", "setup,lint"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "make test: every stage passed"
    record = json.loads(driver.RECORD.read_text())
    assert record["passed"] is True and [s["name"] for s in record["stages"]] == ["setup", "lint"]
    # ... and the README's figure rendered from this very record, after it was written.
    assert json.loads((driver.RECORD.parent / "rendered.json").read_text()) == record


def test_a_figure_that_cannot_be_rendered_fails_the_run_last(driver, monkeypatch, capsys):
    monkeypatch.setattr(driver, "DEFAULT", "setup,lint")
    monkeypatch.setattr(driver, "RENDER", [sys.executable, "-c", "raise SystemExit(1)"])
    assert driver.main(["--plan", "setup,lint"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "every stage passed" in out[-2] and "readme_figures.py failed" in out[-1], out[-3:]


def test_nothing_runs_after_setup_fails(driver, monkeypatch, capsys) -> None:
    monkeypatch.setitem(
        driver.STAGES, "setup", ([[sys.executable, "-c", "raise SystemExit(1)"]], [])
    )
    assert driver.main(["--plan", "setup,lint"]) == 1
    out = capsys.readouterr().out
    assert "lint" in out and "not run (a stage it needs failed)" in out
    record = json.loads((driver.RESULTS / "stages.json").read_text())
    assert record["skipped"] == ["lint"]


def test_molecule_steps_are_timed_from_its_output(driver) -> None:
    line = (
        "\x1b[36mINFO    \x1b[0m \x1b[32mstack\x1b[0m ➜ \x1b[33mconverge\x1b[0m: "
        "\x1b[36mExecuting\x1b[0m"
    )
    assert driver._MOLECULE_STEP.search(line.encode()).group(1) == b"converge"
    tests = line.replace("Executing\x1b[0m", "Executing Testinfra tests found in x/...")
    assert driver._MOLECULE_STEP.search(tests.encode()) is None
    assert driver._numbered([["destroy", 3], ["converge", 9], ["destroy", 2]]) == [
        ("destroy", 3),
        ("converge", 9),
        ("destroy 2", 2),
    ]


def test_a_background_stage_runs_niced_and_its_check_waits_for_it(driver, capsys) -> None:
    assert driver.main(["--plan", "setup,lint+&hosts-up,hosts-check"]) == 0
    out = capsys.readouterr().out
    assert driver.marker.read_text() == "19"
    assert "hosts destroyed" in out  # the check's `always` commands ran
    record = json.loads((driver.RESULTS / "stages.json").read_text())
    stages = {s["name"]: s for s in record["stages"]}
    assert stages["hosts-up"]["background"] is True and stages["hosts-up"]["beside"] == ["lint"]
    assert stages["hosts-up"]["seconds"] >= 1


def test_a_background_stage_is_named_beside_the_later_groups_it_ran_beside(driver) -> None:
    """hosts-up (a second long) starts in a group of its own; lint, the next group, runs
    while it does, and the table says so."""
    assert driver.main(["--plan", "setup,&hosts-up,lint,hosts-check"]) == 0
    record = json.loads((driver.RESULTS / "stages.json").read_text())
    stages = {s["name"]: s for s in record["stages"]}
    assert stages["lint"]["beside"] == ["hosts-up"], stages["lint"]
    assert "beside" not in stages["hosts-check"]  # hosts-up had ended: its check waited


def test_a_check_whose_hosts_failed_only_cleans_up(driver, monkeypatch, capsys) -> None:
    bad = ([[sys.executable, "-c", "raise SystemExit(3)"]], [])
    monkeypatch.setitem(driver.STAGES, "hosts-up", bad)
    assert driver.main(["--plan", "setup,&hosts-up,hosts-check"]) == 1
    out = capsys.readouterr().out
    assert "hosts destroyed" in out
    record = json.loads((driver.RESULTS / "stages.json").read_text())
    assert record["skipped"] == ["hosts-check"]
    assert out.splitlines()[-1] == "make test: 1 stage(s) failed: hosts-up"


def test_each_stage_says_how_busy_the_cpus_were(driver, monkeypatch) -> None:
    """A stage that keeps every CPU busy reads as busy (the whole machine's share, so a busy
    machine cannot make it read idle); the share is busy over all jiffies between a stage's
    start and end. The table then says which stages leave the CPU idle."""
    py = sys.executable
    spin = (
        "import multiprocessing as m, time\n"
        "def f(_):\n    t = time.monotonic()\n    while time.monotonic() - t < 1.5: pass\n"
        "if __name__ == '__main__':\n    m.Pool(m.cpu_count()).map(f, range(m.cpu_count()))"
    )
    stages = dict(driver.STAGES)
    stages["spin"] = ([[py, "-c", spin]], [])
    stages["sleep"] = ([[py, "-c", "import time; time.sleep(1.5)"]], [])
    monkeypatch.setattr(driver, "STAGES", stages)
    assert driver.main(["--plan", "setup,spin,sleep"]) == 0
    busy = {
        s["name"]: s["cpu_busy"]
        for s in json.loads((driver.RESULTS / "stages.json").read_text())["stages"]
    }
    assert 0.5 < busy["spin"] <= 1 and 0 <= busy["sleep"] <= 1, busy
    assert driver._busy_share((100, 400), (250, 600)) == 0.75
    assert driver._busy_share(None, (250, 600)) is None


def test_a_full_disk_is_named_and_the_stage_still_runs_to_its_end(driver, capsys) -> None:
    """CI once ran out of disk mid-stage: the driver's thread died writing the log, and the
    tail named no cause. /dev/full fails every write with ENOSPC, as a full disk does."""
    driver.RESULTS.mkdir(parents=True)
    (driver.RESULTS / "unit.log").symlink_to("/dev/full")
    assert driver.main(["--plan", "setup,unit"]) == 1
    out = capsys.readouterr().out
    tail = "\n".join(out.splitlines()[-6:])
    assert "its log could not be written: [Errno 28] No space left on device" in tail, tail
    # Its tests ran on (their JUnit file names the failure), and so did its cleanup.
    assert "test_the_answer: AssertionError: the answer is off by one" in tail, tail
    assert "cleaned up after the tests" in out
    record = json.loads((driver.RESULTS / "stages.json").read_text())
    assert [s["passed"] for s in record["stages"]] == [True, False]
    disk = record["disk_free_gib"]
    assert 0 < disk["lowest"] <= min(disk["start"], disk["end"]), disk


def test_a_stage_whose_log_was_lost_has_not_passed(driver, capsys) -> None:
    driver.RESULTS.mkdir(parents=True)
    (driver.RESULTS / "lint.log").symlink_to("/dev/full")
    assert driver.main(["--plan", "setup,lint"]) == 1
    tail = capsys.readouterr().out.splitlines()[-3:]
    assert tail[-1] == "make test: 1 stage(s) failed: lint", tail
    assert "No space left on device" in tail[-2], tail
