"""One run per workdir (issue 25, item 1): a second run on a workdir another process is writing
is refused with one error line naming that process; readers see whole files while it writes."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxres import cli, rundir, train
from jaxres.errors import JaxresError
from tests.helpers import REPO, quiet, random_dataset, tiny_config

MISSING_DATA = "/nonexistent/jaxres-data.tar.gz"  # the lock is looked at before the data


def child(script: str, *args: str) -> subprocess.Popen:
    """A Python child running `script` in the repository, its stdin and stdout piped."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args], cwd=REPO, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


HOLD_LOCK = """
    import sys
    from jaxres import rundir
    with rundir.workdir_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()  # until the test lets go
"""


@pytest.fixture
def held_workdir(tmp_path):
    """(workdir, child process) where the child holds the workdir's lock until the test ends."""
    workdir = tmp_path / "run"
    holder = child(HOLD_LOCK, str(workdir))
    assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
    yield workdir, holder
    holder.communicate("\n", timeout=60)
    assert holder.returncode == 0


def test_a_second_run_on_a_workdir_in_use_is_refused_naming_the_other_process(held_workdir, capsys):
    workdir, holder = held_workdir
    assert cli.train_main(["--data", MISSING_DATA, "--workdir", str(workdir)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert f"--workdir {workdir} is in use by another run: process {holder.pid} on " in lines[0]
    assert "wait for it to end, or choose another --workdir" in lines[0]
    with pytest.raises(JaxresError, match=f"in use by another run: process {holder.pid} "):
        train.train_and_evaluate(tiny_config(workdir), dataset=random_dataset(), progress=False, log=quiet)
    assert sorted(path.name for path in workdir.iterdir()) == [rundir.LOCK_NAME]  # nothing else written


def test_a_workdir_with_a_checkpoint_in_use_says_in_use_not_resume(held_workdir, capsys):
    workdir, holder = held_workdir
    (workdir / rundir.CONFIG_NAME).write_text(tiny_config(workdir).to_json())  # the other run's first epoch
    rundir.save_checkpoint(workdir, {"x": np.zeros(2)}, [])
    assert cli.train_main(["--data", MISSING_DATA, "--workdir", str(workdir)]) == 2
    assert f"in use by another run: process {holder.pid} " in capsys.readouterr().err


def test_the_lock_is_reentrant_in_a_process_and_released_with_its_file(tmp_path):
    workdir = tmp_path / "run"
    with rundir.workdir_lock(workdir):
        with rundir.workdir_lock(workdir):  # the CLI holds it around train_and_evaluate, which takes it again
            holder = json.loads((workdir / rundir.LOCK_NAME).read_text())
            assert holder["pid"] == os.getpid()
        rundir.check_workdir(workdir, resume=False)  # this process's own lock does not refuse it
        other = child(HOLD_LOCK, str(workdir))
        _, errors = other.communicate("\n", timeout=120)
        assert other.returncode == 1 and "in use by another run: process" in errors
    assert list(workdir.iterdir()) == []
    other = child(HOLD_LOCK, str(workdir))  # released: another process takes it
    output, errors = other.communicate("\n", timeout=120)
    assert output.strip() == "locked", errors


def test_a_killed_holders_lock_is_free(tmp_path):
    workdir = tmp_path / "run"
    holder = child(HOLD_LOCK, str(workdir))
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait(timeout=60)
    assert (workdir / rundir.LOCK_NAME).exists()  # left behind, but the OS dropped the lock
    with rundir.workdir_lock(workdir):
        assert json.loads((workdir / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()


WRITE_CHECKPOINTS = """
    import sys
    import numpy as np
    from jaxres import rundir
    print("writing", flush=True)
    for version in range(int(sys.argv[2])):
        state = {"params": np.full(100_000, version, np.float32)}
        rundir.save_checkpoint(sys.argv[1], state, [{"epoch": version}])
"""


def test_readers_of_a_workdir_being_written_see_whole_checkpoints(tmp_path):
    """evaluate and gradcam read the checkpoint with `read_checkpoint` (verified), config.json and
    dataset.json whole: every file is replaced by a rename, so a reader never sees a part."""
    workdir = tmp_path / "run"
    rundir.save_checkpoint(workdir, {"params": np.full(100_000, -1, np.float32)}, [{"epoch": -1}])
    writer = child(WRITE_CHECKPOINTS, str(workdir), "300")
    assert writer.stdout.readline().strip() == "writing"
    versions = set()
    while writer.poll() is None:
        state, history = rundir.read_checkpoint(workdir)  # raises on a partial or mixed file
        params = state["params"]
        assert np.all(params == params[0]) and history == [{"epoch": int(params[0])}]
        versions.add(int(params[0]))
    assert writer.wait() == 0, writer.stderr.read()
    assert rundir.read_checkpoint(workdir)[1] == [{"epoch": 299}]
    assert len(versions) >= 1
