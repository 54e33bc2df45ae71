"""lime-jax report on hand-written run dirs (config.gin + metrics.jsonl + eval_results.json)."""
import json
import os

import pytest

from lime_jax.evaluation import report

SEQ_LEN, BATCH = 8, 4  # 32 tokens per step


def _fake_run(root, name, metadata, shift, seed, accs, results=None, dropout=None):
    path = os.path.join(root, name)
    os.makedirs(path)
    with open(os.path.join(path, "config.gin"), "w") as f:
        f.write(f"ModelConfig.metadata = {metadata!r}\nrun.seq_len = {SEQ_LEN}\nrun.batch_size = {BATCH}\n"
                f"run.metadata_shift = {shift}\nrun.seed = {seed}\n")
        if dropout is not None:
            f.write(f"run.metadata_dropout = {dropout}\n")
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for i, acc in enumerate(accs):
            step = 10 * (i + 1)
            f.write(json.dumps({"step": step, "train/loss": 9.0}) + "\n")
            f.write(json.dumps({"step": step, "eval/loss": 5.0 - acc, "eval/accuracy": acc}) + "\n")
    if results:
        with open(os.path.join(path, "eval_results.json"), "w") as f:
            json.dump(results, f)
    return path


def _results(places, addition):
    return {"heldout": {"cohesion": {"by_place": {p: {"n": 10, "accuracy": a} for p, a in zip(report.PLACES, places)}}},
            "addition": {"modes": {m: {"accuracy": a, "n": 30} for m, a in addition.items()}}}


META = (("pos", 52), ("ner", 39))


@pytest.fixture
def runs(tmp_path):
    root = str(tmp_path)
    return [
        _fake_run(root, "base", (), 0, 0, [0.1, 0.2, 0.3, 0.4],
                  _results([0.3, 0.2, 0.2, 0.1, 0.1], {"none": 0.1})),
        _fake_run(root, "lime", META, 0, 0, [0.15, 0.3, 0.45, 0.5],
                  _results([0.35, 0.4, 0.3, 0.3, 0.2], {"reannotated": 0.2})),
        _fake_run(root, "control", META, -1, 0, [0.05, 0.1, 0.2, 0.3]),
        _fake_run(root, "plus1", META, 1, 0, [0.5, 0.6, 0.7, 0.8],
                  _results([0.6, 0.6, 0.5, 0.5, 0.4], {"unguided": 0.1, "guided": 0.6})),
        _fake_run(root, "plus1_dropout", META, 1, 0, [0.5, 0.6, 0.7, 0.8],
                  _results([0.6, 0.6, 0.5, 0.5, 0.4], {"unguided": 0.5, "guided": 0.6}), dropout=0.15),
    ]


def test_tokens_to_reach_interpolates():
    assert report.tokens_to_reach([10, 20, 30], [0.1, 0.3, 0.5], 0.4) == (25.0, True)
    assert report.tokens_to_reach([10, 20, 30], [0.1, 0.3, 0.5], 0.3) == (20.0, True)
    assert report.tokens_to_reach([10, 20], [0.5, 0.6], 0.4) == (10.0, False)  # upper bound
    assert report.tokens_to_reach([10, 20], [0.1, 0.2], 0.4) == (None, False)


def test_report_writes_plots_and_the_data_efficiency_fraction(runs, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert report.main([*runs, "--out", out]) == 0
    for name in ("val_accuracy.png", "val_loss.png", "cohesion.png", "addition.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "report.json")) as f:
        summary = json.load(f)
    eff = summary["data_efficiency"]
    # lime reaches 0.4 between step 20 (0.3) and 30 (0.45): step 26.67 of the baseline's 40.
    assert eff["lime"]["fraction"] == pytest.approx((20 + 10 * 0.1 / 0.15) / 40)
    assert eff["lime"]["exact"] and eff["lime"]["target_accuracy"] == 0.4
    assert eff["control"]["fraction"] is None
    assert eff["plus1"]["fraction"] == pytest.approx(0.25) and not eff["plus1"]["exact"]
    arms = summary["arms"]
    assert set(arms) == {"baseline", "lime", "control(-1)", "lime+1", "lime+1 dropout=0.15"}
    assert arms["lime+1"]["addition"] == {"unguided": 0.1, "guided": 0.6}  # not averaged with...
    assert arms["lime+1 dropout=0.15"]["addition"] == {"unguided": 0.5, "guided": 0.6}  # ...another recipe
    assert arms["lime"]["cohesion_by_place"]["2"] == 0.4
    assert arms["baseline"]["final_tokens"] == 40 * SEQ_LEN * BATCH
    md = open(os.path.join(out, "report.md")).read()
    assert "| lime | base | 0.4000 | 853 | 0.6667 |" in md
    assert "| control | base | 0.4000 | - | not reached |" in md
    assert "<= 0.2500" in md and "| lime+1 | guided | 0.6000 |" in md
    assert "lime: final_acc=0.5000 tokens_to_baseline_acc=0.6667" in capsys.readouterr().out


def test_seeds_pair_with_their_own_baseline(tmp_path):
    root = str(tmp_path)
    dirs = [_fake_run(root, "b0", (), 0, 0, [0.1, 0.2]), _fake_run(root, "b1", (), 0, 1, [0.1, 0.4]),
            _fake_run(root, "l0", META, 0, 0, [0.2, 0.3]), _fake_run(root, "l1", META, 0, 1, [0.2, 0.4])]
    summary = report.report(dirs, str(tmp_path / "out"))
    assert summary["data_efficiency"]["l0"]["baseline"] == "b0"
    assert summary["data_efficiency"]["l1"]["baseline"] == "b1"
    assert summary["data_efficiency"]["l0"]["fraction"] == pytest.approx(0.5)  # reaches 0.2 at step 10 (upper bound)
    assert summary["data_efficiency"]["l1"]["fraction"] == pytest.approx(1.0)
    assert summary["arms"]["lime"]["tokens_to_baseline_acc"] == pytest.approx(0.75)
    assert not os.path.exists(tmp_path / "out" / "cohesion.png")  # no eval_results: no plot
    assert "No `eval_results.json`" in open(tmp_path / "out" / "report.md").read()


def test_bad_run_dirs_are_clear_errors(tmp_path, capsys):
    path = _fake_run(str(tmp_path), "noeval", (), 0, 0, [])
    assert report.main([path, "--out", str(tmp_path / "o")]) == 2
    assert "no eval/accuracy records" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
