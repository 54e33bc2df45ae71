"""`lime-jax report RUN_DIR ... --out DIR`: plots and a markdown summary comparing runs.

Reads each run's `config.gin` (arm, seed, tokens per step), `metrics.jsonl` (the `eval/...`
records the trainer writes) and, when present, `eval_results.json` (`lime-jax eval`). Writes
to `--out`:
- `val_accuracy.png`, `val_loss.png`: held-out accuracy and loss against training tokens;
- `cohesion.png`: held-out accuracy by the target piece's place inside its word;
- `addition.png`: addition exact match per arm, with and without guidance;
- `report.md` (the same numbers) and `report.json`.

Data efficiency: for each non-baseline run, the training tokens at which its held-out accuracy
first reaches the baseline's final held-out accuracy (linear interpolation between evals), as a
fraction of the baseline's tokens. Runs are paired with the baseline of the same seed when there
is one (else the first baseline). If a run's first eval already reaches the target, the fraction
is that eval's tokens (an upper bound, marked `<=`); a run that never reaches it has none.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence

import numpy as np

ARM_ORDER = ("baseline", "lime", "control(-1)", "lime+1")
ARM_COLORS = {"baseline": "#444444", "lime": "#1f77b4", "control(-1)": "#ff7f0e", "lime+1": "#2ca02c"}
PLACES = ("1", "2", "3", "4", "5+")


@dataclasses.dataclass
class Run:
    path: str
    name: str
    arm: str
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


def load_run(path: str) -> Run:
    from lime_jax.trainer import metrics as metrics_lib
    from lime_jax.inference import model_dir

    run_cfg = model_dir.read_run_config(path)
    mpath = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(mpath):
        raise ValueError(f"{mpath}: not found (a run dir written by `lime-jax train` has one)")
    by_step: dict[int, tuple[float, float]] = {}
    for i, rec in enumerate(metrics_lib.read_jsonl(mpath)):
        if "eval/accuracy" in rec:
            try:
                by_step[int(rec["step"])] = (float(rec["eval/accuracy"]), float(rec["eval/loss"]))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{mpath}: line {i + 1}: bad eval record ({e})") from None
    if not by_step:
        raise ValueError(f"{mpath}: no eval/accuracy records (was the run trained with an EVAL_CACHE_DIR?)")
    evals = [(step * run_cfg.tokens_per_step, acc, loss) for step, (acc, loss) in sorted(by_step.items())]
    results = None
    rpath = os.path.join(path, "eval_results.json")
    if os.path.isfile(rpath):
        with open(rpath, encoding="utf-8") as f:
            results = json.load(f)
    return Run(path=os.path.abspath(path), name=os.path.basename(os.path.normpath(path)), arm=run_cfg.arm,
               seed=run_cfg.seed, tokens_per_step=run_cfg.tokens_per_step, evals=evals, results=results)


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
    baselines = [r for r in runs if r.arm == "baseline"]
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


def summarize(runs: Sequence[Run]) -> dict:
    eff = data_efficiency(runs)
    arms = {}
    for arm in _arms(runs):
        rs = [r for r in runs if r.arm == arm]
        entry = {"runs": [r.name for r in rs], "seeds": sorted({r.seed for r in rs}),
                 "final_accuracy": _mean(r.final_accuracy for r in rs),
                 "final_loss": _mean(r.final_loss for r in rs),
                 "final_tokens": _mean(r.final_tokens for r in rs)}
        if arm != "baseline" and eff:
            entry["tokens_to_baseline_acc"] = _mean(eff[r.name]["fraction"] for r in rs)
            entry["reached"] = sum(eff[r.name]["fraction"] is not None for r in rs)
        coh = [r.results["heldout"]["cohesion"]["by_place"] for r in rs
               if r.results and "heldout" in r.results]
        if coh:
            entry["cohesion_by_place"] = {p: _mean(c[p]["accuracy"] for c in coh if p in c) for p in PLACES}
        add = [r.results["addition"]["modes"] for r in rs if r.results and "addition" in r.results]
        if add:
            entry["addition"] = {m: _mean(a[m]["accuracy"] for a in add if m in a) for m in add[0]}
        arms[arm] = entry
    return {"runs": {r.name: {"path": r.path, "arm": r.arm, "seed": r.seed, "final_accuracy": r.final_accuracy,
                              "final_loss": r.final_loss, "final_tokens": r.final_tokens} for r in runs},
            "data_efficiency": eff, "arms": arms}


# ----------------------------------------------------------------------------- plots


def _plot_curves(runs: Sequence[Run], summary: dict, key: int, ylabel: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    seen = set()
    styles = ("-", "--", ":", "-.")
    seeds = sorted({r.seed for r in runs})
    for r in runs:
        color = ARM_COLORS.get(r.arm, None)
        label = r.arm if r.arm not in seen else None
        seen.add(r.arm)
        ax.plot([e[0] / 1e6 for e in r.evals], [e[key] for e in r.evals], styles[seeds.index(r.seed) % 4],
                color=color, marker="o", markersize=3, label=label, linewidth=1.4)
    if key == 1 and "baseline" in summary["arms"]:
        target = summary["arms"]["baseline"]["final_accuracy"]
        ax.axhline(target, color=ARM_COLORS["baseline"], linewidth=0.8, linestyle=":",
                   label=f"baseline final ({target:.3f})")
        for name, e in summary["data_efficiency"].items():
            if e["tokens"] is not None:
                arm = summary["runs"][name]["arm"]
                ax.plot([e["tokens"] / 1e6], [e["target_accuracy"]], marker="*", markersize=11,
                        color=ARM_COLORS.get(arm), markeredgecolor="black", linestyle="none")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel(ylabel)
    title = ylabel
    if len(seeds) > 1:
        title += f" ({len(seeds)} seeds: line style)"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_bars(groups: Sequence[str], series: dict[str, list[float | None]], ylabel: str, title: str,
               path: str, colors: dict[str, str] | None = None, xlabel: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        vals = [np.nan if v is None else v for v in values]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=name,
                      color=(colors or {}).get(name))
        for b, v in zip(bars, vals):
            if not np.isnan(v):
                ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, groups)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- markdown


def _fmt(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(summary: dict, images: dict[str, str]) -> str:
    lines = ["# lime_jax comparison report", ""]
    lines += ["## Runs", "", "| run | arm | seed | tokens | final val acc | final val loss |",
              "|---|---|---|---|---|---|"]
    for name, r in summary["runs"].items():
        lines.append(f"| {name} | {r['arm']} | {r['seed']} | {r['final_tokens']:,} | {_fmt(r['final_accuracy'])} "
                     f"| {_fmt(r['final_loss'])} |")
    lines += ["", "## Data efficiency", ""]
    if summary["data_efficiency"]:
        lines += ["Fraction of the baseline's training tokens at which a run first reaches the baseline's "
                  "final held-out accuracy (the paper: 0.4365 at 500M parameters).", "",
                  "| run | baseline | target acc | tokens | fraction |", "|---|---|---|---|---|"]
        for name, e in summary["data_efficiency"].items():
            frac = "not reached" if e["fraction"] is None else (("" if e["exact"] else "<= ") + f"{e['fraction']:.4f}")
            tok = "-" if e["tokens"] is None else f"{e['tokens']:,.0f}"
            lines.append(f"| {name} | {e['baseline']} | {e['target_accuracy']:.4f} | {tok} | {frac} |")
        lines += ["", "| arm | mean fraction | runs reaching | mean final val acc |", "|---|---|---|---|"]
        for arm, a in summary["arms"].items():
            if arm != "baseline":
                lines.append(f"| {arm} | {_fmt(a.get('tokens_to_baseline_acc'))} | {a.get('reached', 0)}/"
                             f"{len(a['runs'])} | {_fmt(a['final_accuracy'])} |")
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
            lines.append(f"| {arm} | " + " | ".join(_fmt(c.get(p)) for p in PLACES) + " |")
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
    return "\n".join(lines)


def report(run_dirs: Sequence[str], out: str) -> dict:
    """Loads the runs, writes the plots, report.md and report.json to `out`; returns the summary."""
    if not run_dirs:
        raise ValueError("no run directories given")
    runs = [load_run(p) for p in run_dirs]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):  # same basename in different parents: use the paths
        for r in runs:
            r.name = os.path.relpath(r.path)
    summary = summarize(runs)
    os.makedirs(out, exist_ok=True)
    images = {k: f"{k}.png" for k in ("val_accuracy", "val_loss", "cohesion", "addition")}
    _plot_curves(runs, summary, 1, "held-out next-token accuracy", os.path.join(out, images["val_accuracy"]))
    _plot_curves(runs, summary, 2, "held-out loss", os.path.join(out, images["val_loss"]))
    written = [images["val_accuracy"], images["val_loss"]]
    coh = {arm: a["cohesion_by_place"] for arm, a in summary["arms"].items() if "cohesion_by_place" in a}
    if coh:
        _plot_bars(PLACES, {arm: [c.get(p) for p in PLACES] for arm, c in coh.items()}, "held-out accuracy",
                   "Token cohesion: accuracy by place of the piece in its word", os.path.join(out, images["cohesion"]),
                   ARM_COLORS, xlabel="place of the target piece in its word")
        written.append(images["cohesion"])
    add = {arm: a["addition"] for arm, a in summary["arms"].items() if "addition" in a}
    if add:
        modes = sorted({m for v in add.values() for m in v}, key=lambda m: ("none", "reannotated", "unguided",
                                                                            "guided").index(m)
                       if m in ("none", "reannotated", "unguided", "guided") else 9)
        _plot_bars(list(add), {m: [add[a].get(m) for a in add] for m in modes}, "exact match",
                   "Addition accuracy with and without metadata guidance", os.path.join(out, images["addition"]),
                   {"none": "#444444", "reannotated": "#1f77b4", "unguided": "#9467bd", "guided": "#2ca02c"})
        written.append(images["addition"])
    summary["images"] = [os.path.join(os.path.abspath(out), w) for w in written]
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown(summary, images) + "\n")
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lime-jax report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Reads each"):])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="directory for the plots and report.md")
    args = p.parse_args(argv)
    from lime_jax.inference.model_dir import ModelDirError

    try:
        summary = report(args.run_dirs, args.out)
    except (ModelDirError, ValueError, OSError) as e:
        print(f"lime-jax report: {e}", file=sys.stderr)
        return 2
    for arm, a in summary["arms"].items():
        extra = "" if arm == "baseline" or "tokens_to_baseline_acc" not in a else \
            f" tokens_to_baseline_acc={_fmt(a['tokens_to_baseline_acc'])}"
        print(f"{arm}: final_acc={_fmt(a['final_accuracy'])}{extra}")
    print(f"wrote {os.path.join(os.path.abspath(args.out), 'report.md')} and " + ", ".join(summary["images"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
