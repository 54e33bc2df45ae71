"""Plots and a markdown summary comparing runs (`lime-jax report RUN_DIR ... --out DIR`).

Reads each run's `config.gin` (arm, seed, tokens per step), `tag_sources.json` (where the tags
of its training and held-out caches came from), `metrics.jsonl` (the `eval/...` records the
trainer writes, and `eval_<name>/...` for extra held-out sets, e.g. the same documents re-tagged
by an honest source) and, when present, `eval_results*.json` (`lime-jax eval`). Writes to
`--out`:
- `val_accuracy.png`, `val_loss.png`: held-out accuracy and loss against training tokens;
- `cohesion.png`: held-out accuracy by the target piece's place inside its word;
- `addition.png`: addition exact match per arm, with and without guidance;
- `modes.png`: per arm, held-out accuracy, addition and reasoning by where the tags come from
  (`lime-jax eval` modes: `main` the held-out set's own tags, `none`, `reannotated`, `unguided`,
  `self`, `guided`), oracle figures hatched; with a table of each tag head's accuracy;
- `report.md` (the same numbers) and `report.json`.

Data efficiency: for each non-baseline run, the training tokens at which its held-out accuracy
first reaches the baseline's final held-out accuracy (linear interpolation between evals), as a
fraction of the baseline's tokens. Runs are paired with the baseline of the same seed when there
is one (else the first baseline). If a run's first eval already reaches the target, the fraction
is that eval's tokens (an upper bound, marked `<=`); a run that never reaches it has none.

Oracle or honest: every arm is named by its kind and its tag sources, `lime (oracle)` or
`lime (oracle, eval prefix)` (trained on oracle tags, evaluated with prefix tags), and marked
honest only when its held-out tags never saw the text after the predicted piece: an honest
source (`prefix`, `tagger`) for LIME or the previous-piece arm. LIME+1 sees the tags of the
piece it predicts, so its figures are never honest. `aux` (tag heads, no tag inputs) uses tags
only as training targets: like the baseline, honest. `gain_share` = (acc_arm - acc_baseline) /
(acc_oracle - acc_baseline), against `lime (oracle)`: the share of the oracle gain an arm keeps.
Per mode: `unguided`, `self` (the model's own forecast) and re-annotated addition (each
generated prefix re-tagged) are honest; `guided` (the gold answer's tags) is oracle; `main` and
re-annotated reasoning (prompt + answer tagged as one text) are as honest as the run's source.
A mode's `gain_share` takes, on the same task, the baseline's figure and `lime (oracle)`'s
figure with its own tags (held-out: `main`; addition, reasoning: `reannotated`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import numpy as np

ORACLE_ARM = "lime (oracle)"
ARM_ORDER = ("baseline", "aux", ORACLE_ARM, "lime (oracle, eval prefix)", "lime (oracle, eval tagger)", "lime (tagger)",
             "lime+heads (oracle)", "prev-piece (oracle)", "lime+1 (oracle)", "lime+1+heads (oracle)")
_PALETTE = ("#444444", "#1f77b4", "#17becf", "#9467bd", "#d62728", "#ff7f0e", "#2ca02c", "#8c564b", "#e377c2",
            "#bcbd22")
PLACES = ("1", "2", "3", "4", "5+")
TASK_TITLES = {"heldout": "held-out next-token accuracy", "addition": "addition (exact match)",
               "reasoning": "reasoning (choice accuracy)"}
# One colour per mode in every plot; the order is the bars' and the tables'.
MODE_COLORS = {"main": "#8c564b", "none": "#444444", "reannotated": "#1f77b4", "unguided": "#9467bd",
               "self": "#ff7f0e", "guided": "#2ca02c"}
# (baseline's mode, lime (oracle)'s mode) a mode's gain_share is measured between, per task.
_GAIN_REF = {"heldout": ("main", "main"), "addition": ("none", "reannotated"), "reasoning": ("none", "reannotated")}


@dataclasses.dataclass
class Run:
    path: str
    name: str
    arm: str
    honest: bool  # its held-out tags never saw the text after the predicted piece
    tag_source: str  # of its held-out tags: oracle, prefix or tagger
    seed: int
    tokens_per_step: int
    evals: list[tuple[int, float, float]]  # (tokens, accuracy, loss), by step
    results: dict | None  # eval_results.json

    @property
    def final_accuracy(self) -> float:
        return self.evals[-1][1]

    @property
    def final_loss(self) -> float:
        return self.evals[-1][2]

    @property
    def final_tokens(self) -> int:
        return self.evals[-1][0]


def _short(source: str) -> str:
    return source.split(":", 1)[0]  # tagger:DIR -> tagger


def arm_label(kind: str, shift: int, train_source: str, eval_source: str) -> tuple[str, bool]:
    """(`kind (train source[, eval source])`, honest?) of one run's held-out set."""
    from lime_jax.annotation.tag_sources import is_honest

    if kind in ("baseline", "aux"):  # no tag inputs (aux: tags are only its heads' targets)
        return kind, True
    base_kind, _, recipe = kind.partition(" ")  # e.g. "lime+1 dropout=0.15"
    sources = train_source if eval_source == train_source else f"{train_source}, eval {eval_source}"
    label = f"{base_kind} ({sources})" + (f" {recipe}" if recipe else "")
    return label, is_honest(eval_source, shift)


def load_runs(path: str) -> list[Run]:
    """One Run per held-out set of a run dir: `eval/...` and each extra `eval_<name>/...`."""
    from lime_jax.annotation.tag_sources import TAG_SOURCES_NAME
    from lime_jax.inference import model_dir
    from lime_jax.trainer import metrics as metrics_lib

    run_cfg = model_dir.read_run_config(path)
    mpath = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(mpath):
        raise ValueError(f"{mpath}: not found (a run dir written by `lime-jax train` has one)")
    sources = {"train": "oracle", "eval": "oracle"}  # runs from before sources were recorded
    spath = os.path.join(path, TAG_SOURCES_NAME)
    if os.path.isfile(spath):
        with open(spath, encoding="utf-8") as f:
            sources.update(json.load(f))
    by_set: dict[str, dict[int, tuple[float, float]]] = {}
    for i, rec in enumerate(metrics_lib.read_jsonl(mpath)):
        for key in rec:
            if key == "eval/accuracy" or (key.startswith("eval_") and key.endswith("/accuracy")):
                prefix = key[:-len("/accuracy")]
                try:
                    by_set.setdefault(prefix, {})[int(rec["step"])] = (float(rec[key]), float(rec[f"{prefix}/loss"]))
                except (KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{mpath}: line {i + 1}: bad {prefix} record ({e})") from None
    if "eval" not in by_set:
        raise ValueError(f"{mpath}: no eval/accuracy records (was the run trained with an EVAL_CACHE_DIR?)")
    results = {}
    for name in sorted(os.listdir(path)):
        if name.startswith("eval_results") and name.endswith(".json"):
            with open(os.path.join(path, name), encoding="utf-8") as f:
                res = json.load(f)
            results[_short(res.get("tag_source", "oracle"))] = res
    base = os.path.basename(os.path.normpath(path))
    runs = []
    for prefix, by_step in sorted(by_set.items(), key=lambda kv: kv[0] != "eval"):
        eval_source = _short(sources.get(prefix, "oracle"))
        arm, honest = arm_label(run_cfg.arm, run_cfg.shift, _short(sources["train"]), eval_source)
        evals = [(step * run_cfg.tokens_per_step, acc, loss) for step, (acc, loss) in sorted(by_step.items())]
        runs.append(Run(path=os.path.abspath(path), name=base if prefix == "eval" else f"{base}@{prefix[5:]}",
                        arm=arm, honest=honest, tag_source=eval_source, seed=run_cfg.seed,
                        tokens_per_step=run_cfg.tokens_per_step,
                        evals=evals, results=results.get(eval_source)))
    return runs


def tokens_to_reach(tokens: Sequence[float], accuracies: Sequence[float], target: float
                    ) -> tuple[float | None, bool]:
    """(tokens at which accuracy first reaches `target`, exact?) by linear interpolation.

    Not exact (an upper bound) when the first point already reaches it; None if never reached.
    """
    for i, (t, a) in enumerate(zip(tokens, accuracies)):
        if a >= target:
            if i == 0:
                return float(t), False
            t0, a0 = tokens[i - 1], accuracies[i - 1]
            return float(t0 + (target - a0) / (a - a0) * (t - t0)), True
    return None, False


def data_efficiency(runs: Sequence[Run]) -> dict[str, dict]:
    """Per non-baseline run: `{"fraction", "exact", "baseline", "target_accuracy"}`."""
    baselines = [r for r in runs if r.arm == "baseline" and "@" not in r.name]
    out = {}
    if not baselines:
        return out
    for r in runs:
        if r.arm == "baseline":
            continue
        base = next((b for b in baselines if b.seed == r.seed), baselines[0])
        reach, exact = tokens_to_reach([e[0] for e in r.evals], [e[1] for e in r.evals], base.final_accuracy)
        out[r.name] = {"fraction": None if reach is None else reach / base.final_tokens, "exact": exact,
                       "baseline": base.name, "target_accuracy": base.final_accuracy,
                       "tokens": reach}
    return out


def _arms(runs: Sequence[Run]) -> list[str]:
    present = {r.arm for r in runs}
    return [a for a in ARM_ORDER if a in present] + sorted(present - set(ARM_ORDER))


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else None


def _ordered(modes) -> list[str]:
    return sorted(modes, key=lambda m: list(MODE_COLORS).index(m) if m in MODE_COLORS else len(MODE_COLORS))


def _figures(r: Run) -> dict[str, dict[str, dict]]:
    """{task: {mode: result}} of a run's `lime-jax eval` results; held-out `main` is the result
    itself (the set's own tags), beside its `modes`."""
    out = {}
    for task in TASK_TITLES:
        res = (r.results or {}).get(task)
        # Without --tags, held-out text keeps its cache's tags (a re-tagged cache's source) while
        # addition and reasoning use oracle tags: a results file, named by its held-out tags, may
        # hold tasks tagged otherwise, which belong to the run's set with their source.
        if res is None or _short(res.get("tag_source", "oracle")) != r.tag_source:
            continue
        out[task] = {"main": res, **res.get("modes", {})} if task == "heldout" else res["modes"]
    return out


def _mode_honest(task: str, mode: str, honest: bool) -> bool:
    """Whether a mode's tags never saw the text after the predicted piece (module docstring);
    `honest`: the run's tag source's flag."""
    if mode == "guided":
        return False
    return honest if mode == "main" or (task == "reasoning" and mode == "reannotated") else True


def summarize(runs: Sequence[Run]) -> dict:
    eff = data_efficiency(runs)
    arms = {}
    for arm in _arms(runs):
        rs = [r for r in runs if r.arm == arm]
        entry = {"runs": [r.name for r in rs], "seeds": sorted({r.seed for r in rs}), "honest": rs[0].honest,
                 "final_accuracy": _mean(r.final_accuracy for r in rs),
                 "final_loss": _mean(r.final_loss for r in rs),
                 "final_tokens": _mean(r.final_tokens for r in rs)}
        if arm != "baseline" and eff:
            entry["tokens_to_baseline_acc"] = _mean(eff[r.name]["fraction"] for r in rs)
            entry["reached"] = sum(eff[r.name]["fraction"] is not None for r in rs)
        figs = [_figures(r) for r in rs]
        coh = [f["heldout"]["main"]["cohesion"]["by_place"] for f in figs if "heldout" in f]
        if coh:
            entry["cohesion_by_place"] = {p: _mean(c[p]["accuracy"] for c in coh if p in c) for p in PLACES}
        modes, heads = {}, {}
        for task in TASK_TITLES:
            by_mode: dict[str, list] = {}
            for f in figs:
                for mode, res in f.get(task, {}).items():
                    by_mode.setdefault(mode, []).append(res.get("accuracy"))
                    for h, v in res.get("heads", {}).items():
                        heads.setdefault(h, {}).setdefault(mode, []).append(v["accuracy"])
            accs = {m: _mean(by_mode[m]) for m in _ordered(by_mode)}
            task_figs = {m: {"accuracy": a, "honest": _mode_honest(task, m, entry["honest"])}
                         for m, a in accs.items() if a is not None}
            if task_figs:
                modes[task] = task_figs
        if modes:
            entry["modes"] = modes
        if "addition" in modes:
            entry["addition"] = {m: v["accuracy"] for m, v in modes["addition"].items()}
        if heads:
            entry["heads"] = {h: {m: _mean(a) for m, a in by_mode.items()} for h, by_mode in sorted(heads.items())}
        arms[arm] = entry
    base, oracle = arms.get("baseline"), arms.get(ORACLE_ARM)
    if base and oracle:
        if oracle["final_accuracy"] != base["final_accuracy"]:
            for arm, entry in arms.items():
                if arm != "baseline":
                    entry["gain_share"] = ((entry["final_accuracy"] - base["final_accuracy"])
                                           / (oracle["final_accuracy"] - base["final_accuracy"]))
        for task, (base_mode, oracle_mode) in _GAIN_REF.items():
            b = base.get("modes", {}).get(task, {}).get(base_mode, {}).get("accuracy")
            o = oracle.get("modes", {}).get(task, {}).get(oracle_mode, {}).get("accuracy")
            if b is None or o is None or o == b:
                continue
            for arm, entry in arms.items():
                if arm != "baseline":
                    for fig in entry.get("modes", {}).get(task, {}).values():
                        fig["gain_share"] = (fig["accuracy"] - b) / (o - b)
    return {"runs": {r.name: {"path": r.path, "arm": r.arm, "honest": r.honest, "seed": r.seed,
                              "final_accuracy": r.final_accuracy,
                              "final_loss": r.final_loss, "final_tokens": r.final_tokens} for r in runs},
            "data_efficiency": eff, "arms": arms}


# ----------------------------------------------------------------------------- plots


def arm_colors(arms) -> dict[str, str]:
    return {arm: _PALETTE[i % len(_PALETTE)] for i, arm in enumerate(arms)}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)


def _plot_curves(runs: Sequence[Run], summary: dict, key: int, ylabel: str, path: str) -> None:
    fig, ax = _pyplot().subplots(figsize=(7, 4.5), dpi=110)
    seen = set()
    styles = ("-", "--", ":", "-.")
    seeds = sorted({r.seed for r in runs})
    colors = arm_colors(summary["arms"])
    for r in runs:
        color = colors[r.arm]
        label = r.arm if r.arm not in seen else None
        seen.add(r.arm)
        ax.plot([e[0] / 1e6 for e in r.evals], [e[key] for e in r.evals], styles[seeds.index(r.seed) % 4],
                color=color, marker="o", markersize=3, label=label, linewidth=1.4)
    if key == 1 and "baseline" in summary["arms"]:
        target = summary["arms"]["baseline"]["final_accuracy"]
        ax.axhline(target, color=colors["baseline"], linewidth=0.8, linestyle=":",
                   label=f"baseline final ({target:.3f})")
        for name, e in summary["data_efficiency"].items():
            if e["tokens"] is not None:
                arm = summary["runs"][name]["arm"]
                ax.plot([e["tokens"] / 1e6], [e["target_accuracy"]], marker="*", markersize=11,
                        color=colors[arm], markeredgecolor="black", linestyle="none")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel(ylabel)
    title = ylabel
    if len(seeds) > 1:
        title += f" ({len(seeds)} seeds: line style)"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _bars(ax, groups: Sequence[str], series: dict[str, list[float | None]], colors: dict[str, str] | None = None,
          oracle: dict[str, list[bool]] | None = None) -> None:
    """Grouped bars: one group per entry of `groups`, one bar per series; `oracle` {series: a flag
    per group} hatches the bars of figures that used oracle tags."""
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        vals = [np.nan if v is None else v for v in values]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=name,
                      color=(colors or {}).get(name))
        for b, v, hatched in zip(bars, vals, (oracle or {}).get(name, [False] * len(vals))):
            if hatched:
                b.set_hatch("//")
                b.set_edgecolor("black")
            if not np.isnan(v):
                ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, groups)
    ax.grid(alpha=0.3, axis="y")


def _plot_bars(groups: Sequence[str], series: dict[str, list[float | None]], ylabel: str, title: str,
               path: str, colors: dict[str, str] | None = None, xlabel: str = "") -> None:
    fig, ax = _pyplot().subplots(figsize=(7, 4.5), dpi=110)
    _bars(ax, groups, series, colors)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)


def _plot_modes(modes: dict[str, dict], path: str) -> None:
    """One panel per task: per arm, a bar per mode (`arms[arm]["modes"]`), oracle figures hatched."""
    from matplotlib.patches import Patch

    tasks = [t for t in TASK_TITLES if any(t in m for m in modes.values())]
    fig, axes = _pyplot().subplots(1, len(tasks), figsize=(5.5 * len(tasks), 5), dpi=110, squeeze=False)
    shown = set()
    for ax, task in zip(axes[0], tasks):
        arms = [a for a, m in modes.items() if task in m]
        figs = {mode: [modes[a][task].get(mode) for a in arms]
                for mode in _ordered({m for a in arms for m in modes[a][task]})}
        _bars(ax, arms, {m: [f and f["accuracy"] for f in fs] for m, fs in figs.items()}, MODE_COLORS,
              {m: [bool(f) and not f["honest"] for f in fs] for m, fs in figs.items()})
        _pyplot().setp(ax.get_xticklabels(), rotation=25, ha="right", fontsize=8)
        ax.set_title(TASK_TITLES[task])
        ax.set_ylabel("accuracy")
        shown |= set(figs)
    axes[0][0].legend(handles=[Patch(color=MODE_COLORS.get(m), label=m) for m in _ordered(shown)]
                      + [Patch(facecolor="white", edgecolor="black", hatch="//", label="oracle tags")], fontsize=7)
    _save(fig, path)


# ----------------------------------------------------------------------------- markdown


def _fmt(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _tags(arm: str, honest: bool) -> str:
    if arm == "baseline":
        return "none"
    if arm == "aux":
        return "none (targets only)"
    if arm.startswith("lime+1"):
        return "oracle (its own targets' tags)"
    return "honest" if honest else "oracle"


def _mode_tags(arm: str, mode: str, honest: bool) -> str:
    """The tags column of a mode figure: the arm's own for `main`/`none`, else honest or oracle."""
    return _tags(arm, honest) if mode in ("main", "none") else ("honest" if honest else "oracle")


def _modes_section(summary: dict, images: dict[str, str]) -> list[str]:
    modes = {arm: a["modes"] for arm, a in summary["arms"].items() if "modes" in a}
    lines = ["## Tag sources side by side", ""]
    if not modes:
        return lines + ["No `lime-jax eval` results in the runs.", ""]
    lines += ["Per arm (mean over seeds), `lime-jax eval` figures by where the tags come from: `main` the "
              "held-out set's own tags, `none` no tag inputs, `reannotated` spaCy (or the tagger) over the "
              "prompt and the text so far, `unguided` PAD (no metadata), `self` the model's own forecasts "
              "(its tag heads), `guided` the gold answer's oracle tags. Gain share: against the baseline's and "
              f"`{ORACLE_ARM}`'s figures on the same task (held-out: `main`; addition, reasoning: baseline `none`, "
              "LIME `reannotated`).", "",
              "| arm | task | mode | tags | accuracy | gain share |", "|---|---|---|---|---|---|"]
    for arm, by_task in modes.items():
        for task, figs in by_task.items():
            for mode, f in figs.items():
                lines.append(f"| {arm} | {task} | {mode} | {_mode_tags(arm, mode, f['honest'])} | "
                             f"{_fmt(f['accuracy'])} | {_fmt(f.get('gain_share'), 3)} |")
    lines += ["", f"![tag sources]({images['modes']})", ""]
    heads = {arm: a["heads"] for arm, a in summary["arms"].items() if "heads" in a}
    if heads:
        cols = _ordered({m for by_head in heads.values() for by_mode in by_head.values() for m in by_mode})
        lines += ["### Tag heads", "", "Held-out accuracy of each tag head against the cache's (spaCy) tags, "
                  "by the tags the model was fed.", "",
                  "| arm | head | " + " | ".join(f"{m} tags" for m in cols) + " |", "|---|---|" + "---|" * len(cols)]
        for arm, by_head in heads.items():
            for h, by_mode in by_head.items():
                lines.append(f"| {arm} | {h} | " + " | ".join(_fmt(by_mode.get(m)) for m in cols) + " |")
        lines.append("")
    return lines


def markdown(summary: dict, images: dict[str, str]) -> str:
    lines = ["# lime_jax comparison report", "",
             "Tags: **oracle** = spaCy over the whole document (sees the text after the predicted piece); "
             "**honest** = only text up to the piece the model has (`prefix`: spaCy over that text; `tagger`: "
             "the causal tagger). An arm is named `kind (training tags[, eval held-out tags])`. `aux` is fed no "
             "tags: the training cache's (oracle) tags are only the targets of its tag heads, so its figures are "
             "honest.", ""]
    lines += ["## Runs", "", "| run | arm | tags | seed | tokens | final val acc | final val loss |",
              "|---|---|---|---|---|---|---|"]
    for name, r in summary["runs"].items():
        lines.append(f"| {name} | {r['arm']} | {_tags(r['arm'], r['honest'])} | {r['seed']} | {r['final_tokens']:,} "
                     f"| {_fmt(r['final_accuracy'])} | {_fmt(r['final_loss'])} |")
    lines += ["", "## Data efficiency", ""]
    if summary["data_efficiency"]:
        lines += ["Fraction of the baseline's training tokens at which a run first reaches the baseline's "
                  "final held-out accuracy (the paper: 0.4365 at 500M parameters).", "",
                  "| run | baseline | target acc | tokens | fraction |", "|---|---|---|---|---|"]
        for name, e in summary["data_efficiency"].items():
            frac = "not reached" if e["fraction"] is None else (("" if e["exact"] else "<= ") + f"{e['fraction']:.4f}")
            tok = "-" if e["tokens"] is None else f"{e['tokens']:,.0f}"
            lines.append(f"| {name} | {e['baseline']} | {e['target_accuracy']:.4f} | {tok} | {frac} |")
        lines += ["", "| arm | tags | mean fraction | runs reaching | mean final val acc | gain share |",
                  "|---|---|---|---|---|---|"]
        for arm, a in summary["arms"].items():
            if arm != "baseline":
                lines.append(f"| {arm} | {_tags(arm, a['honest'])} | {_fmt(a.get('tokens_to_baseline_acc'))} | "
                             f"{a.get('reached', 0)}/{len(a['runs'])} | {_fmt(a['final_accuracy'])} | "
                             f"{_fmt(a.get('gain_share'), 3)} |")
    else:
        lines.append("No baseline run given: no data-efficiency point.")
    lines += ["", f"![validation accuracy]({images['val_accuracy']})", "",
              f"![validation loss]({images['val_loss']})", ""]
    coh = {arm: a["cohesion_by_place"] for arm, a in summary["arms"].items() if "cohesion_by_place" in a}
    lines += ["## Token cohesion", ""]
    if coh:
        lines += ["Held-out accuracy by the target piece's place inside its word (`lime-jax eval`).", "",
                  "| arm | " + " | ".join(f"place {p}" for p in PLACES) + " |",
                  "|---|" + "---|" * len(PLACES)]
        for arm, c in coh.items():
            lines.append(f"| {arm} [{_tags(arm, summary['arms'][arm]['honest'])}] | "
                         + " | ".join(_fmt(c.get(p)) for p in PLACES) + " |")
        lines += ["", f"![cohesion]({images['cohesion']})", ""]
    else:
        lines += ["No `eval_results.json` in the runs: run `lime-jax eval --model_dir RUN` first.", ""]
    add = {arm: a["addition"] for arm, a in summary["arms"].items() if "addition" in a}
    lines += ["## Addition (exact match, greedy)", ""]
    if add:
        lines += ["| arm | mode | accuracy |", "|---|---|---|"]
        for arm, modes in add.items():
            for mode, acc in modes.items():
                lines.append(f"| {arm} | {mode} | {_fmt(acc)} |")
        lines += ["", f"![addition]({images['addition']})", ""]
    else:
        lines += ["No addition results (`lime-jax eval --task addition`).", ""]
    return "\n".join(lines + _modes_section(summary, images))


def report(run_dirs: Sequence[str], out: str) -> dict:
    """Loads the runs, writes the plots, report.md and report.json to `out`; returns the summary."""
    if not run_dirs:
        raise ValueError("no run directories given")
    runs = [r for p in run_dirs for r in load_runs(p)]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):  # same basename in different parents: use the paths
        for r in runs:
            r.name = os.path.relpath(r.path) + r.name[len(os.path.basename(r.path)):]  # keeps "@<set>"
    summary = summarize(runs)
    os.makedirs(out, exist_ok=True)
    images = {k: f"{k}.png" for k in ("val_accuracy", "val_loss", "cohesion", "addition", "modes")}
    _plot_curves(runs, summary, 1, "held-out next-token accuracy", os.path.join(out, images["val_accuracy"]))
    _plot_curves(runs, summary, 2, "held-out loss", os.path.join(out, images["val_loss"]))
    written = [images["val_accuracy"], images["val_loss"]]
    coh = {arm: a["cohesion_by_place"] for arm, a in summary["arms"].items() if "cohesion_by_place" in a}
    if coh:
        _plot_bars(PLACES, {arm: [c.get(p) for p in PLACES] for arm, c in coh.items()}, "held-out accuracy",
                   "Token cohesion: accuracy by place of the piece in its word", os.path.join(out, images["cohesion"]),
                   arm_colors(summary["arms"]), xlabel="place of the target piece in its word")
        written.append(images["cohesion"])
    add = {arm: a["addition"] for arm, a in summary["arms"].items() if "addition" in a}
    if add:
        add_modes = _ordered({m for v in add.values() for m in v})
        _plot_bars(list(add), {m: [add[a].get(m) for a in add] for m in add_modes}, "exact match",
                   "Addition accuracy with and without metadata guidance", os.path.join(out, images["addition"]),
                   MODE_COLORS)
        written.append(images["addition"])
    modes = {arm: a["modes"] for arm, a in summary["arms"].items() if "modes" in a}
    if modes:
        _plot_modes(modes, os.path.join(out, images["modes"]))
        written.append(images["modes"])
    summary["images"] = [os.path.join(os.path.abspath(out), w) for w in written]
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown(summary, images) + "\n")
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary


def summary_lines(summary: dict) -> list[str]:
    """One line per arm: its final held-out accuracy and, past the baseline, its data efficiency;
    then, with `lime-jax eval` results, one line of its figures per task and mode (oracle marked)."""
    lines = []
    for arm, a in summary["arms"].items():
        extra = "" if arm == "baseline" or "tokens_to_baseline_acc" not in a else \
            f" tokens_to_baseline_acc={_fmt(a['tokens_to_baseline_acc'])}"
        if "gain_share" in a:
            extra += f" gain_share={_fmt(a['gain_share'], 3)}"
        lines.append(f"{arm} [{_tags(arm, a['honest'])}]: final_acc={_fmt(a['final_accuracy'])}{extra}")
        if "modes" in a:
            lines.append("  " + "; ".join(
                f"{task}: " + " ".join(f"{m}={_fmt(f['accuracy'])}" + ("" if f["honest"] else " (oracle)")
                                       for m, f in figs.items()) for task, figs in a["modes"].items()))
    return lines
