"""The progress display shared by annotation (documents) and training (steps), off a terminal."""
import logging

from lime_jax.progress import Progress
from lime_jax.trainer import metrics


def test_lines_every_n_units_and_at_the_end_with_eta():
    lines = []
    bar = Progress(10, "step", every_n=4, log=lines.append)
    for n in range(1, 11):
        bar.update(n, {"loss": 2.0 / n, "note": "x"})
    assert [line.split()[:2] for line in lines] == [["step", "4/10"], ["step", "8/10"], ["step", "10/10"]]
    assert lines[0].startswith("step 4/10 loss=0.5 note=x eta=0:00:0")
    assert lines[-1].endswith("eta=0:00:00")


def test_unknown_total_and_time_gate():
    lines = []
    bar = Progress(None, "doc", desc="annotate", every_s=3600, log=lines.append)
    bar.update(5, {"words_per_s": "1,234"})
    assert lines == []  # the first line waits `every_s` seconds
    bar = Progress(None, "doc", desc="annotate", log=lines.append)
    bar.update(5, {"words_per_s": "1,234"})
    assert lines == ["annotate: 5 docs words_per_s=1,234"]


def test_disabled_is_silent():
    lines = []
    bar = Progress(3, "step", enabled=False, log=lines.append)
    bar.update(3, {"loss": 1.0})
    bar.write("eval")
    bar.close()
    assert lines == []


def test_training_steps_go_to_the_trainer_log():
    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    logger, handler = logging.getLogger("lime_jax.trainer.metrics"), Collect()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        bar = metrics.Progress(6, 2, 2)  # resumed at step 2, a line every 2 steps
        for step in range(3, 7):
            bar.update(step, {"loss": 3.0})
        bar.write("eval step 6: loss=3.0")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [m.split(" eta=")[0] for m in handler.messages] == [
        "step 4/6 loss=3", "step 6/6 loss=3", "eval step 6: loss=3.0"]
