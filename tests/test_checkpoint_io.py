"""Model-dir I/O at scale: every path through etils.epath, the seal written after Orbax's commit
(outside its barrier), seals checked once per resume by process 0 with the verdict shared, also
when process 0 fails."""
import ast
import logging
import os
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from lime_jax.trainer import checkpoint as ckpt_lib
from lime_jax.trainer import distributed
from lime_jax.trainer import metrics as metrics_lib
from lime_jax.trainer.config import CheckpointConfig, ConfigError
from lime_jax.trainer.state import TrainState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module_file(module):
    return os.path.join(REPO, *module.__name__.split(".")) + ".py"


@pytest.mark.parametrize("module", [ckpt_lib, metrics_lib], ids=lambda m: m.__name__)
def test_model_dir_io_goes_through_epath_only(module):
    """No os/shutil/glob/pathlib import and no builtin `open`: a gs:// model dir would break them."""
    tree = ast.parse(open(_module_file(module)).read())
    offenders = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
            names = ["open()"]
        else:
            continue
        offenders += [f"line {node.lineno}: {n}" for n in names if n in {"os", "shutil", "glob", "pathlib", "open()"}]
    assert not offenders, f"{module.__name__} bypasses epath: {offenders}"


def _state(step: int) -> TrainState:
    return TrainState(params={"w": jnp.arange(8.0) * step, "b": jnp.ones((3,))},
                      opt_state={"m": jnp.full((8,), float(step))},
                      step=jnp.int32(step), rng=jax.random.key_data(jax.random.key(step)))


def _abstract() -> TrainState:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(0))


@pytest.fixture(params=["str", "epath"])
def model_dir(request, tmp_path):
    return str(tmp_path / "run") if request.param == "str" else epath.Path(tmp_path) / "run"


def test_save_seal_check_restore(model_dir):
    ckpt = ckpt_lib.Checkpointer(model_dir, keep=3)
    for step in (1, 2):
        ckpt.save(step, _state(step), None)
    ckpt.close()
    d = epath.Path(model_dir).resolve() / "checkpoints"
    for step in (1, 2):
        assert (d / str(step) / ckpt_lib.SEAL_NAME).is_file()
        assert ckpt_lib.check_step_dir(d / str(step)) is None
        assert ckpt_lib.check_step_dir(str(d / str(step))) is None
    ckpt = ckpt_lib.Checkpointer(model_dir)
    try:
        step, state = ckpt.restore_newest_intact(_abstract(), None)
    finally:
        ckpt.close()
    assert step == 2 and int(state.step) == 2
    np.testing.assert_array_equal(state.params["w"], np.arange(8.0) * 2)
    params, step = ckpt_lib.restore_params(model_dir, _abstract().params)
    assert step == 2 and np.array_equal(params["w"], np.arange(8.0) * 2)


def test_seal_is_written_after_the_commit_not_inside_it(model_dir, monkeypatch):
    """Orbax commits the step while the hashing is held back; the seal follows, joined at wait."""
    release, hashing = threading.Event(), threading.Event()
    real_hash = ckpt_lib.sha256_file

    def held_hash(path):
        hashing.set()
        assert release.wait(60), "the test never released the hashing"
        return real_hash(path)

    monkeypatch.setattr(ckpt_lib, "sha256_file", held_hash)
    ckpt = ckpt_lib.Checkpointer(model_dir)
    try:
        ckpt.save(1, _state(1), None)
        assert hashing.wait(60), "the seal never started"
        step_dir = ckpt.step_dir(1)
        # Committed (Orbax lists it and its temporary directory is gone) with the hash pending.
        reader = ckpt_lib.Checkpointer(model_dir, read_only=True)
        assert reader.all_steps() == [1]
        reader.close()
        assert not list(ckpt.directory.glob("1.orbax-checkpoint-tmp*"))
        assert not (step_dir / ckpt_lib.SEAL_NAME).exists()
        assert "no lime_jax_seal.json" in ckpt_lib.check_step_dir(step_dir)
        release.set()
        ckpt.wait()
        assert ckpt_lib.check_step_dir(step_dir) is None
    finally:
        release.set()
        ckpt.close()


def test_unsealed_step_falls_back_and_is_quarantined(model_dir, caplog):
    ckpt = ckpt_lib.Checkpointer(model_dir)
    for step in (1, 2):
        ckpt.save(step, _state(step), None)
    ckpt.close()
    (ckpt.step_dir(2) / ckpt_lib.SEAL_NAME).unlink()  # the run stopped while sealing step 2
    ckpt = ckpt_lib.Checkpointer(model_dir)
    try:
        with caplog.at_level(logging.WARNING, logger="lime_jax.trainer.checkpoint"):
            step, state = ckpt.restore_newest_intact(_abstract(), None)
        assert step == 1 and int(state.step) == 1
        assert ckpt.all_steps() == [1]  # reloaded after the move
    finally:
        ckpt.close()
    assert f"checkpoint {ckpt.step_dir(2)} is damaged: no lime_jax_seal.json" in caplog.text
    moved = list((epath.Path(model_dir).resolve() / ckpt_lib.DAMAGED_SUBDIR).glob("2-*"))
    assert len(moved) == 1 and (moved[0] / "params").is_dir()


def test_a_failed_seal_stops_the_next_save(model_dir, monkeypatch):
    ckpt = ckpt_lib.Checkpointer(model_dir)

    def full_disk(step_dir):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_lib, "write_seal", full_disk)
    try:
        ckpt.save(1, _state(1), None)
        with pytest.raises(ckpt_lib.CheckpointError, match=r"sealing checkpoint step 1 .*No space left.*unsealed"):
            ckpt.save(2, _state(2), None)
    finally:
        ckpt.close()
    assert ckpt_lib.Checkpointer(model_dir, read_only=True).all_steps() == [1]


def _unreadable(path: epath.Path) -> None:
    """Reads of `path` fail with EIO, as on a failing disk, also for root (whom permissions do not
    stop): it becomes a link to /proc/self/mem, whose first page is never mapped."""
    path.unlink()
    os.symlink("/proc/self/mem", path)


def test_process_0_failing_to_check_or_move_raises_checkpoint_error(model_dir):
    """An I/O error while checking, or a damaged step that cannot be moved aside, stops the
    resume with CheckpointError (on every process: test_two_processes_share_process_0s_verdict)."""
    ckpt = ckpt_lib.Checkpointer(model_dir)
    for step in (1, 2):
        ckpt.save(step, _state(step), None)
    ckpt.close()
    seal = ckpt.step_dir(2) / ckpt_lib.SEAL_NAME
    _unreadable(seal)
    io_error = r"checking the checkpoint seals in .*checkpoints failed on process 0: OSError: .*Input/output error"
    ckpt = ckpt_lib.Checkpointer(model_dir)
    try:
        with pytest.raises(ckpt_lib.CheckpointError, match=io_error):
            ckpt.restore_newest_intact(_abstract(), None)
        assert ckpt.all_steps() == [1, 2]  # an I/O error is no verdict on the step: nothing moved
    finally:
        ckpt.close()
    with pytest.raises(ckpt_lib.CheckpointError, match=io_error):
        ckpt_lib.restore_params(model_dir, _abstract().params)

    seal.unlink()  # step 2 is now unsealed (damaged), and the directory to move it to is a file
    (ckpt.model_dir / ckpt_lib.DAMAGED_SUBDIR).write_text("")
    ckpt = ckpt_lib.Checkpointer(model_dir)
    try:
        with pytest.raises(ckpt_lib.CheckpointError, match=r"moving damaged checkpoints to .*checkpoints.damaged "
                                                           r"failed on process 0: FileExistsError"):
            ckpt.restore_newest_intact(_abstract(), None)
    finally:
        ckpt.close()


def test_keeping_one_step_is_refused():
    """Orbax deletes the older steps when it commits a new one, which is sealed only after: with
    one step kept, a run stopped while sealing would leave none intact."""
    with pytest.raises(ConfigError, match=r"CheckpointConfig.keep must be at least 2, got 1: .*no intact checkpoint"):
        CheckpointConfig(keep=1)
    with pytest.raises(ValueError, match="keep=1 must be at least 2"):
        ckpt_lib.Checkpointer("unused", keep=1)


def test_metrics_writer_on_an_epath_model_dir(tmp_path):
    model_dir = epath.Path(tmp_path) / "run"
    writer = metrics_lib.MetricsWriter(model_dir)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step})
    writer.close()
    assert [s for s, _ in metrics_lib.read_event_scalars(model_dir / "tb")["loss"]] == [1, 2, 3]
    with (model_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "train/lo')  # a line cut short by a kill
    writer = metrics_lib.MetricsWriter(model_dir, resume_step=2)  # resumed from step 2
    writer.write(3, {"loss": 0.25})
    writer.close()
    assert [(r["step"], r["loss"]) for r in metrics_lib.read_jsonl(model_dir / "metrics.jsonl")] == \
        [(1, 1.0), (2, 0.5), (3, 0.25)]


_TWO_PROCESS_SCRIPT = r"""
import os
import sys
import numpy as np
from lime_jax.trainer import distributed
distributed.distributed_setup()
import jax, jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from lime_jax.trainer import checkpoint as ckpt_lib
from lime_jax.trainer.state import TrainState
from etils import epath

model_dir, me = sys.argv[1], jax.process_index()
mesh = jax.make_mesh((2,), ("d",))
def put(x, spec):
    return jax.make_array_from_callback(np.shape(x), NamedSharding(mesh, spec), lambda i: np.asarray(x)[i])
def state(step):
    return TrainState(params={"w": put(np.arange(8.0) * step, P("d"))}, opt_state={"m": put(np.ones(8), P("d"))},
                      step=put(np.int32(step), P()), rng=put(np.zeros(2, np.uint32), P()))
ckpt = ckpt_lib.Checkpointer(model_dir)
for step in (1, 2):
    ckpt.save(step, state(step), None)
ckpt.close()
if me == 0:  # step 2's params, damaged on the shared disk
    f = max((root / n for root, _, names in (ckpt.step_dir(2) / "params").walk() for n in names),
            key=lambda p: p.stat().length)
    f.write_bytes(f.read_bytes()[:-4])
multihost_utils.sync_global_devices("damaged")
checked = []
real_check = ckpt_lib.check_step_dir
ckpt_lib.check_step_dir = lambda d, *a: checked.append(d) or real_check(d, *a)
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state(0))
ckpt = ckpt_lib.Checkpointer(model_dir)
step, restored = ckpt.restore_newest_intact(abstract, None)
steps_seen = ckpt.all_steps()
ckpt.close()
_, params_step = ckpt_lib.restore_params(model_dir, abstract.params)
print(f"RESULT {me} step={step} state_step={int(restored.step)} checked={len(checked)} steps={steps_seen} "
      f"params_step={params_step}", flush=True)

# Process 0 failing alone: every process must raise, none may wait for its verdict.
def failure(fn):
    try:
        fn()
    except ckpt_lib.CheckpointError as e:
        return str(e).replace(str(fail_dir), "DIR")
    return "no error"
def resume():
    ckpt = ckpt_lib.Checkpointer(fail_dir)
    try:
        ckpt.restore_newest_intact(abstract, None)
    finally:
        ckpt.close()
fail_dir = epath.Path(sys.argv[2])
ckpt = ckpt_lib.Checkpointer(fail_dir)
for step in (1, 2):
    ckpt.save(step, state(step), None)
ckpt.close()
seal = ckpt.step_dir(2) / ckpt_lib.SEAL_NAME
if me == 0:  # reads of the seal fail with EIO (as in _unreadable)
    seal.unlink()
    os.symlink("/proc/self/mem", seal)
multihost_utils.sync_global_devices("unreadable")
print(f"FAILED {me} resume: {failure(resume)}", flush=True)
print(f"FAILED {me} params: {failure(lambda: ckpt_lib.restore_params(fail_dir, abstract.params))}", flush=True)
if me == 0:  # step 2 unsealed (damaged), and where it would move is a file
    seal.unlink()
    (fail_dir / ckpt_lib.DAMAGED_SUBDIR).write_text("")
multihost_utils.sync_global_devices("immovable")
print(f"FAILED {me} move: {failure(resume)}", flush=True)
"""


def test_two_processes_share_process_0s_verdict(tmp_path):
    """Only process 0 reads the seals; both restore the step it chose, the damaged step is moved
    once, and both see the same step list afterwards. When process 0 fails to check or to move,
    both raise CheckpointError (a hang would hit the timeout, an uncaught error exit 1)."""
    model_dir, logs = tmp_path / "run", tmp_path / "logs"
    procs = distributed.spawn_local([sys.executable, "-c", _TWO_PROCESS_SCRIPT, str(model_dir),
                                     str(tmp_path / "fail")],
                                    num_processes=2, devices_per_process=1, log_dir=str(logs))
    codes = distributed.wait_all(procs, timeout_s=120)
    out = {i: (logs / f"process_{i}.log").read_text() for i in range(2)}
    assert codes == [0, 0], out
    results = {i: next(line for line in out[i].splitlines() if line.startswith("RESULT")) for i in range(2)}
    # Process 0 checks step 2 (damaged) then step 1; restore_params checks step 1 once more.
    assert results[0] == "RESULT 0 step=1 state_step=1 checked=3 steps=[1] params_step=1"
    assert results[1] == "RESULT 1 step=1 state_step=1 checked=0 steps=[1] params_step=1"
    assert len(list((model_dir / ckpt_lib.DAMAGED_SUBDIR).glob("2-*"))) == 1
    assert "checkpoint" in out[0] and "is damaged: file params/" in out[0]
    failed = {i: [line for line in out[i].splitlines() if line.startswith("FAILED")] for i in range(2)}
    check = "checking the checkpoint seals in DIR/checkpoints"
    move = "moving damaged checkpoints to DIR/checkpoints.damaged"
    assert failed[0] == [f"FAILED 0 resume: {check} failed on process 0: OSError: [Errno 5] Input/output error",
                         f"FAILED 0 params: {check} failed on process 0: OSError: [Errno 5] Input/output error",
                         f"FAILED 0 move: {move} failed on process 0: FileExistsError: [Errno 17] File exists: "
                         "'DIR/checkpoints.damaged'"]
    assert failed[1] == [f"FAILED 1 resume: {check} failed on process 0 (its log names the error)",
                         f"FAILED 1 params: {check} failed on process 0 (its log names the error)",
                         f"FAILED 1 move: {move} failed on process 0 (its log names the error)"]
