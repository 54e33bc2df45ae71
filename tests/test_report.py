"""lime-jax report on hand-written run dirs (config.gin + metrics.jsonl + eval_results.json)."""
import json
import os

import pytest

from lime_jax.cli import report as report_cli
from lime_jax.evaluation import report

SEQ_LEN, BATCH = 8, 4  # 32 tokens per step


def _fake_run(root, name, metadata, shift, seed, accs, results=None, dropout=None, extra_evals=None, heads=()):
    """A run dir; `extra_evals` {name: (tag source, accuracies)}: extra held-out sets."""
    path = os.path.join(root, name)
    os.makedirs(path)
    with open(os.path.join(path, "config.gin"), "w") as f:
        f.write(f"ModelConfig.metadata = {metadata!r}\nrun.seq_len = {SEQ_LEN}\nrun.batch_size = {BATCH}\n"
                f"run.metadata_shift = {shift}\nrun.seed = {seed}\nModelConfig.tag_heads = {heads!r}\n")
        if dropout is not None:
            f.write(f"run.metadata_dropout = {dropout}\n")
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for i, acc in enumerate(accs):
            step = 10 * (i + 1)
            f.write(json.dumps({"step": step, "train/loss": 9.0}) + "\n")
            f.write(json.dumps({"step": step, "eval/loss": 5.0 - acc, "eval/accuracy": acc}) + "\n")
            for set_name, (_, set_accs) in (extra_evals or {}).items():
                f.write(json.dumps({"step": step, f"eval_{set_name}/loss": 5.0 - set_accs[i],
                                    f"eval_{set_name}/accuracy": set_accs[i]}) + "\n")
    if extra_evals:
        with open(os.path.join(path, "tag_sources.json"), "w") as f:
            json.dump({"train": "oracle", "eval": "oracle",
                       **{f"eval_{n}": src for n, (src, _) in extra_evals.items()}}, f)
    if results:
        with open(os.path.join(path, "eval_results.json"), "w") as f:
            json.dump(results, f)
    return path


def _results(places, addition):
    return {"heldout": {"cohesion": {"by_place": {p: {"n": 10, "accuracy": a} for p, a in zip(report.PLACES, places)}}},
            "addition": {"modes": {m: {"accuracy": a, "n": 30} for m, a in addition.items()}}}


META = (("pos", 53), ("ner", 40))


@pytest.fixture
def runs(tmp_path):
    root = str(tmp_path)
    return [
        _fake_run(root, "base", (), 0, 0, [0.1, 0.2, 0.3, 0.4],
                  _results([0.3, 0.2, 0.2, 0.1, 0.1], {"none": 0.1})),
        _fake_run(root, "lime", META, 0, 0, [0.15, 0.3, 0.45, 0.5],
                  _results([0.35, 0.4, 0.3, 0.3, 0.2], {"reannotated": 0.2}),
                  extra_evals={"prefix": ("prefix", [0.1, 0.2, 0.35, 0.45])}),
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
    assert report_cli.main([*runs, "--out", out]) == 0
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
    arms = summary["arms"]
    assert set(arms) == {"baseline", "lime (oracle)", "lime (oracle, eval prefix)", "prev-piece (oracle)",
                         "lime+1 (oracle)", "lime+1 (oracle) dropout=0.15"}
    # The honest figure: the oracle-trained LIME run evaluated with prefix tags reaches the baseline's
    # 0.4 between step 30 (0.35) and 40 (0.45), at 35 of 40 steps, and keeps half the oracle gain.
    honest = arms["lime (oracle, eval prefix)"]
    assert honest["honest"] and not arms["lime (oracle)"]["honest"] and not arms["lime+1 (oracle)"]["honest"]
    assert eff["lime@prefix"]["fraction"] == pytest.approx(35 / 40) and eff["lime@prefix"]["exact"]
    assert honest["tokens_to_baseline_acc"] == pytest.approx(35 / 40)
    assert honest["gain_share"] == pytest.approx((0.45 - 0.4) / (0.5 - 0.4))
    assert arms["lime (oracle)"]["gain_share"] == pytest.approx(1.0)
    assert arms["lime+1 (oracle)"]["addition"] == {"unguided": 0.1, "guided": 0.6}  # not averaged with...
    assert arms["lime+1 (oracle) dropout=0.15"]["addition"] == {"unguided": 0.5, "guided": 0.6}  # ...another recipe
    assert arms["lime (oracle)"]["cohesion_by_place"]["2"] == 0.4
    assert arms["baseline"]["final_tokens"] == 40 * SEQ_LEN * BATCH
    md = open(os.path.join(out, "report.md")).read()
    assert "| lime | base | 0.4000 | 853 | 0.6667 |" in md
    assert "| control | base | 0.4000 | - | not reached |" in md
    assert "| lime (oracle, eval prefix) | honest | 0.8750 | 1/1 | 0.4500 | 0.500 |" in md
    # LIME+1 sees the tags of the piece it predicts: its figure is labelled as such, never honest.
    assert "| lime+1 (oracle) | oracle (its own targets' tags) | <= 0.2500 |" not in md
    assert "| lime+1 (oracle) | oracle (its own targets' tags) | 0.2500 |" in md
    assert "| lime+1 (oracle) | guided | 0.6000 |" in md
    out_lines = capsys.readouterr().out
    assert "lime (oracle) [oracle]: final_acc=0.5000 tokens_to_baseline_acc=0.6667 gain_share=1.000" in out_lines
    assert "lime (oracle, eval prefix) [honest]: final_acc=0.4500 tokens_to_baseline_acc=0.8750" in out_lines


def _mode_results(heldout, addition, reasoning):
    """eval_results with the figures per mode; `heldout` {mode: (accuracy, {head: accuracy})},
    `main` the held-out set's own tags."""
    def one(acc, heads):
        return {"accuracy": acc, "loss": 5.0 - acc, **({"heads": {h: {"accuracy": a, "n": 9} for h, a in heads.items()}}
                                                        if heads else {})}

    main = heldout.pop("main")
    res = {"heldout": {**one(*main), "cohesion": {"by_place": {}}}}
    if heldout:
        res["heldout"]["modes"] = {m: one(*v) for m, v in heldout.items()}
    for task, modes in (("addition", addition), ("reasoning", reasoning)):
        res[task] = {"modes": {m: {"accuracy": a, "n": 30, "by_bucket": {}} for m, a in modes.items()}}
    return res


AUX_HEADS = (("pos", 53, 1, 1.0), ("ner", 40, 1, 1.0))
SELF_PLUS1_HEADS = (("pos", 53, 2, 1.0), ("ner", 40, 2, 1.0))


def test_modes_side_by_side_label_tags_and_keep_the_oracle_gain_share(tmp_path, capsys):
    root = str(tmp_path)
    accs = [0.1, 0.2, 0.3, 0.4]
    plus1 = dict(addition={"unguided": 0.1, "guided": 0.6, "self": 0.4},
                 reasoning={"unguided": 0.5, "guided": 0.8, "self": 0.6})
    dirs = [
        _fake_run(root, "base", (), 0, 0, accs, _mode_results({"main": (0.4, {})}, {"none": 0.1}, {"none": 0.5})),
        _fake_run(root, "aux", (), 0, 0, accs,
                  _mode_results({"main": (0.42, {"pos_ahead1": 0.8, "ner_ahead1": 0.9})}, {"none": 0.15},
                                {"none": 0.55}), heads=AUX_HEADS),
        _fake_run(root, "lime", META, 0, 0, accs,
                  _mode_results({"main": (0.5, {}), "unguided": (0.35, {})}, {"reannotated": 0.3, "unguided": 0.1},
                                {"reannotated": 0.7, "unguided": 0.5})),
        # Two seeds of self-guided LIME+1: the arm shows their mean.
        _fake_run(root, "plus1_self0", META, 1, 0, accs,
                  _mode_results({"main": (0.7, {"pos_ahead2": 0.6}), "unguided": (0.3, {"pos_ahead2": 0.2}),
                                 "self": (0.45, {"pos_ahead2": 0.5})}, **plus1), heads=SELF_PLUS1_HEADS),
        _fake_run(root, "plus1_self1", META, 1, 1, accs,
                  _mode_results({"main": (0.7, {"pos_ahead2": 0.6}), "unguided": (0.3, {"pos_ahead2": 0.2}),
                                 "self": (0.55, {"pos_ahead2": 0.7})}, **plus1), heads=SELF_PLUS1_HEADS),
    ]
    out = str(tmp_path / "out")
    assert report_cli.main([*dirs, "--out", out]) == 0
    with open(os.path.join(out, "modes.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "report.json")) as f:
        arms = json.load(f)["arms"]
    assert list(arms) == ["baseline", "aux", "lime (oracle)", "lime+1+heads (oracle)"]
    assert arms["aux"]["honest"] and not arms["lime+1+heads (oracle)"]["honest"]
    held = arms["lime+1+heads (oracle)"]["modes"]["heldout"]
    assert list(held) == ["main", "unguided", "self"]
    # Self tags: the seeds' mean 0.5 against baseline 0.4 and oracle LIME 0.5 (held-out, own tags).
    assert held["self"] == {"accuracy": pytest.approx(0.5), "honest": True, "gain_share": pytest.approx(1.0)}
    assert held["main"]["gain_share"] == pytest.approx(3.0) and not held["main"]["honest"]
    # Addition: against baseline `none` 0.1 and oracle LIME `reannotated` 0.3.
    assert arms["lime+1+heads (oracle)"]["modes"]["addition"]["self"]["gain_share"] == pytest.approx(1.5)
    assert arms["aux"]["modes"]["addition"]["none"]["gain_share"] == pytest.approx(0.25)
    assert arms["lime+1+heads (oracle)"]["heads"] == {"pos_ahead2": {"main": 0.6, "unguided": 0.2,
                                                                     "self": pytest.approx(0.6)}}
    md = open(os.path.join(out, "report.md")).read()
    assert "| aux | aux | none (targets only) | 0 |" in md  # the runs table
    section = md[md.index("## Tag sources side by side"):]
    for row in ("| baseline | heldout | main | none | 0.4000 | - |",
                "| aux | heldout | main | none (targets only) | 0.4200 | 0.200 |",
                "| lime (oracle) | heldout | main | oracle | 0.5000 | 1.000 |",
                "| lime (oracle) | heldout | unguided | honest | 0.3500 | -0.500 |",
                "| lime (oracle) | addition | reannotated | honest | 0.3000 | 1.000 |",  # each prefix re-tagged
                "| lime (oracle) | reasoning | reannotated | oracle | 0.7000 | 1.000 |",  # prompt + answer as one
                "| lime+1+heads (oracle) | heldout | main | oracle (its own targets' tags) | 0.7000 | 3.000 |",
                "| lime+1+heads (oracle) | heldout | self | honest | 0.5000 | 1.000 |",
                "| lime+1+heads (oracle) | addition | guided | oracle | 0.6000 | 2.500 |",
                "| lime+1+heads (oracle) | reasoning | self | honest | 0.6000 | 0.500 |",
                "![tag sources](modes.png)",
                "| arm | head | main tags | unguided tags | self tags |",
                "| aux | ner_ahead1 | 0.9000 | - | - |",
                "| lime+1+heads (oracle) | pos_ahead2 | 0.6000 | 0.2000 | 0.6000 |"):
        assert row in section, row
    lines = capsys.readouterr().out
    assert ("  heldout: main=0.7000 (oracle) unguided=0.3000 self=0.5000; addition: unguided=0.1000 "
            "self=0.4000 guided=0.6000 (oracle); reasoning: unguided=0.5000 self=0.6000 guided=0.8000 (oracle)"
            in lines)
    assert "aux [none (targets only)]: final_acc=0.4000" in lines


def test_seeds_pair_with_their_own_baseline(tmp_path):
    root = str(tmp_path)
    dirs = [_fake_run(root, "b0", (), 0, 0, [0.1, 0.2]), _fake_run(root, "b1", (), 0, 1, [0.1, 0.4]),
            _fake_run(root, "l0", META, 0, 0, [0.2, 0.3]), _fake_run(root, "l1", META, 0, 1, [0.2, 0.4])]
    summary = report.report(dirs, str(tmp_path / "out"))
    assert summary["data_efficiency"]["l0"]["baseline"] == "b0"
    assert summary["data_efficiency"]["l1"]["baseline"] == "b1"
    assert summary["data_efficiency"]["l0"]["fraction"] == pytest.approx(0.5)  # reaches 0.2 at step 10 (upper bound)
    assert summary["data_efficiency"]["l1"]["fraction"] == pytest.approx(1.0)
    assert summary["arms"]["lime (oracle)"]["tokens_to_baseline_acc"] == pytest.approx(0.75)
    assert not os.path.exists(tmp_path / "out" / "cohesion.png")  # no eval_results: no plot
    assert "No `eval_results.json`" in open(tmp_path / "out" / "report.md").read()


def test_bad_run_dirs_are_clear_errors(tmp_path, capsys):
    path = _fake_run(str(tmp_path), "noeval", (), 0, 0, [])
    assert report_cli.main([path, "--out", str(tmp_path / "o")]) == 2
    assert "no eval/accuracy records" in capsys.readouterr().err
    assert report_cli.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
