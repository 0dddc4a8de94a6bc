"""Outputs are checked before the work, have one writer, and keep no debris of killed runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from loraprune.cli import main
from loraprune.safety.output import OutputLockedError, claim_output
from loraprune.safety.staging import clean_beside, owned_temp_dir, remove_dead_temp_dirs, temp_prefix
from loraprune.sweep import parse_spec, run_sweep
from loraprune.sweep.runner import SCRATCH_DIR, SCRATCH_PREFIX


def dead_pid() -> int:
    """The PID of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def unwritable(kind: str, tmp_path: Path) -> Path:
    """A directory in which nothing can be created: under a file, or read-only."""
    if kind == "parent is a file":
        (tmp_path / "file").write_text("not a directory")
        return tmp_path / "file"
    if os.geteuid() != 0:
        directory = tmp_path / "read-only"
        directory.mkdir(mode=0o555)
        return directory
    if Path("/sys").is_dir() and _mkdir_refused(Path("/sys/loraprune-probe")):
        return Path("/sys")  # root writes everywhere but in sysfs
    pytest.skip("no read-only directory for root on this machine")


def _mkdir_refused(path: Path) -> bool:
    try:
        path.mkdir()
    except OSError:
        return True
    path.rmdir()
    return False


SPEC = {
    "job": "model",
    "metrics": ["sparsity_decoder"],
    "fixed": {"run": {"model": "no-such-model", "method": "magnitude"}},
    "grid": {"run.sparsity": [0.1, 0.2]},
}


def command(name: str, where: Path, tmp_path: Path) -> list[str]:
    """A run of command `name` whose output would go under `where`, on a model that does not exist (so
    the output check provably comes before any loading)."""
    missing = str(tmp_path / "no-such-model")
    if name == "eval --json":
        return ["eval", "--model", missing, "--json", str(where / "eval.json")]
    if name == "sweep --output":
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump(SPEC))
        return ["sweep", str(spec), "--output", str(where / "sweep"), "--no-progress"]
    method = ["--method", "magnitude"] if name == "prune-nm" else []
    return [name, "--model", missing, *method, "--output", str(where / "out")]


@pytest.mark.parametrize("kind", ["parent is a file", "read-only"])
@pytest.mark.parametrize("name", ["prune-model", "prune-nm", "prune-adapter", "eval --json", "sweep --output"])
def test_writing_commands_check_their_output_first(name, kind, tmp_path, capsys):
    where = unwritable(kind, tmp_path)
    started = time.monotonic()
    assert main(command(name, where, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"loraprune {name.split()[0]}: error: cannot write "), err
    assert "no-such-model" not in err[0]
    assert time.monotonic() - started < 10


def test_report_checks_its_directory_first(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    run = tmp_path / "run"
    run.mkdir()
    (run / "loraprune_report.json").write_text(json.dumps({"command": "prune-model"}))
    run.chmod(0o555)
    assert main(["report", str(run)]) == 2
    assert "cannot write the report into" in capsys.readouterr().err


def write_lock(target: Path, pid: int, host: str) -> Path:
    path = target.parent / f".{target.name}.lock"
    path.write_text(json.dumps({"pid": pid, "host": host, "since": "2026-12-02 06:00:00"}))
    return path


def test_a_live_holder_on_this_host_or_any_holder_elsewhere_keeps_the_lock(tmp_path):
    target = tmp_path / "out"
    lock = write_lock(target, os.getppid(), socket.gethostname())
    holder = rf"being written by PID {os.getppid()} on host {socket.gethostname()}"
    with pytest.raises(OutputLockedError, match=holder), claim_output(target):
        pass
    write_lock(target, dead_pid(), "another-host")
    elsewhere = r"on host another-host .* delete .*lock if that run is gone"
    with pytest.raises(OutputLockedError, match=elsewhere), claim_output(target):
        pass
    assert lock.exists()  # never taken from its holder


def test_a_stale_lock_is_taken_over_and_released(tmp_path, caplog):
    target = tmp_path / "out"
    pid = dead_pid()
    lock = write_lock(target, pid, socket.gethostname())
    with claim_output(target) as claimed:
        assert claimed == target
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(OutputLockedError, match=f"PID {os.getpid()}"), claim_output(target):
            pass  # one writer, even in one process
    assert f"taking over the lock {lock} of PID {pid}" in caplog.text
    assert not lock.exists()


def test_only_the_temp_dirs_of_dead_processes_are_removed(tmp_path):
    target = tmp_path / "out"
    mine = owned_temp_dir(tmp_path, temp_prefix(target, "partial"))
    dead = tmp_path / f".out.partial-{dead_pid()}-abc"
    other_output = tmp_path / f".other.partial-{dead_pid()}-abc"
    for path in (dead, other_output):
        path.mkdir()
    clean_beside(target)
    assert mine.is_dir() and not dead.exists() and other_output.is_dir()
    assert mine.name.startswith(f".out.partial-{os.getpid()}-")


def test_an_output_retired_by_a_killed_overwrite_is_restored(tmp_path):
    target = tmp_path / "out"
    retired = tmp_path / f".out.old-{dead_pid()}-abc"
    (retired / "out").mkdir(parents=True)
    (retired / "out" / "config.json").write_text("{}")
    clean_beside(target)
    assert (target / "config.json").is_file() and not retired.exists()


def test_a_sweep_removes_the_scratch_of_a_killed_sweep(tmp_path):
    spec = parse_spec({**SPEC, "output": str(tmp_path / "sweep")})
    stale = tmp_path / "sweep" / SCRATCH_DIR / f"{SCRATCH_PREFIX}{dead_pid()}-0123abcd-x"
    (stale / "output").mkdir(parents=True)
    seen = []

    def job(configs, output):
        seen.append(output)
        return {"sparsity_decoder": 0.1}

    run_sweep(spec, job=job, progress=False)
    assert not stale.exists() and len(seen) == 2
    assert all(p.parent.name.startswith(f"{SCRATCH_PREFIX}{os.getpid()}-") and not p.parent.exists() for p in seen)
    assert remove_dead_temp_dirs(tmp_path / "sweep" / SCRATCH_DIR, SCRATCH_PREFIX) == []
