"""The `lime-jax` dispatcher: a reader that stops reading ends a command quietly."""
import subprocess
import sys

from test_report import META, _fake_run


def _run_into_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """Runs `lime-jax ARGS` with its stdout a pipe whose only reader is gone before it writes,
    as `lime-jax ... | head` once head has its lines."""
    proc = subprocess.Popen([sys.executable, "-m", "lime_jax", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    return subprocess.CompletedProcess(proc.args, proc.wait(), None, err)


def test_usage_into_a_closed_pipe_exits_quietly():
    done = subprocess.run([sys.executable, "-m", "lime_jax", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage: lime-jax COMMAND" in done.stdout
    gone = _run_into_closed_pipe("--help")
    assert (gone.returncode, gone.stderr) == (141, "")  # 128 + SIGPIPE, as `yes | head` reports


def test_subcommand_output_into_a_closed_pipe_exits_quietly(tmp_path):
    runs = [_fake_run(str(tmp_path), "base", (), 0, 0, [0.1, 0.2]),
            _fake_run(str(tmp_path), "lime", META, 0, 0, [0.15, 0.3])]
    gone = _run_into_closed_pipe("report", *runs, "--out", str(tmp_path / "out"))
    assert (gone.returncode, gone.stderr) == (141, "")
    assert (tmp_path / "out" / "report.md").exists()  # the work was done; only printing stopped
