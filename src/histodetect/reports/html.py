"""`histodetect report`: one self-contained offline HTML page describing a trained run."""

from __future__ import annotations

import time
from pathlib import Path

from histodetect.errors import HistodetectError
from histodetect.files import write_atomic
from histodetect.reports.markup import esc, img, interval, missing, num, read_json, table
from histodetect.reports.scope import section_scope

REPORT_FILE = "report.html"
EXPLAIN_DIR = "explain"
SYNTHETIC_BANNER = "SYNTHETIC DATA"

# (key in metrics_<split>.json, label shown, what it means)
METRIC_ROWS = (
    ("auc", "ROC AUC", "ranking quality over all thresholds (0.5 = chance, 1 = perfect)"),
    ("average_precision", "Average precision", "area under the precision-recall curve"),
    ("sensitivity", "Sensitivity (recall)", "share of tumour patches flagged"),
    ("specificity", "Specificity", "share of normal patches left unflagged"),
    ("precision", "Precision (PPV)", "share of flagged patches that are tumour"),
    ("accuracy", "Accuracy", "share of patches classified correctly"),
    ("balanced_accuracy", "Balanced accuracy", "mean of sensitivity and specificity"),
    ("f1", "F1", "harmonic mean of precision and sensitivity"),
    ("log_loss", "Log-loss", "lower is better; penalises confident mistakes"),
    ("brier", "Brier score", "lower is better; mean squared probability error"),
)

CSS = """
*{box-sizing:border-box}
body{font:15px/1.5 -apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1d1d1f;
  background:#f4f5f7;margin:0}
main{max-width:1180px;margin:0 auto;padding:1.5em 2em 3em;background:#fff;
  box-shadow:0 0 12px rgba(0,0,0,.06)}
h1{font-size:1.7em;margin:.2em 0 .1em}
h2{font-size:1.3em;margin:1.8em 0 .5em;padding-bottom:.2em;border-bottom:2px solid #e3e5e8}
h3{font-size:1.05em;margin:1.2em 0 .4em}
.sub{color:#555;margin:0 0 1em}
.banner{background:#b00020;color:#fff;font-weight:700;padding:.8em 1.1em;border-radius:4px;
  margin:1em 0;font-size:1.05em}
.note{background:#f6f8fa;border-left:4px solid #8a94a6;padding:.6em 1em;margin:1em 0;
  color:#333}
.missing{background:#fff8e1;border-left:4px solid #e0a800;padding:.6em 1em;margin:1em 0}
nav{font-size:.92em;margin:.5em 0 1em}
nav a{color:#0b5cad;margin-right:1.1em;text-decoration:none}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:.93em}
th,td{border:1px solid #d9dce1;padding:4px 10px;text-align:right;vertical-align:top}
th{background:#eef0f3}
td{white-space:nowrap}
td.l,th.l{text-align:left;white-space:normal}
tr:nth-child(even) td{background:#fafbfc}
.dim{color:#666;font-size:.9em}
.cards{display:flex;flex-wrap:wrap;gap:.8em;margin:1em 0}
.card{flex:1 1 160px;border:1px solid #d9dce1;border-radius:6px;padding:.6em .9em}
.card .k{color:#555;font-size:.85em}
.card .v{font-size:1.45em;font-weight:600}
.card .ci{color:#555;font-size:.85em}
figure{margin:1em 0}
figure img{max-width:100%;height:auto;display:block;border:1px solid #e3e5e8}
figcaption{color:#555;font-size:.88em;margin-top:.3em}
pre{background:#f6f8fa;border:1px solid #e3e5e8;padding:.8em;overflow-x:auto;font-size:.85em;
  line-height:1.35}
pre.cfg{column-width:17em;column-gap:2em;column-rule:1px solid #e3e5e8}
code{font-size:.92em}
footer{margin-top:2.5em;color:#666;font-size:.85em}
"""


def _section_header(run: Path, model: dict, synthetic: bool, evals: dict[str, dict]) -> list[str]:
    arch = model.get("arch", "?")
    crop = model.get("crop", 96)
    sub = (
        f"Model {arch}, sees the centre {crop}x{crop} px of each 96x96 px patch; decision "
        f"threshold {float(model.get('threshold', 0.5)):.3f}"
    )
    if model.get("temperature") not in (None, 1.0):
        sub += f"; probabilities calibrated with temperature {float(model['temperature']):.3f}"
    parts = [
        f"<h1>Tumour detection report: {esc(run.name)}</h1>",
        f'<p class="sub">{esc(sub)}. Run folder <code>{esc(run.resolve())}</code>, report '
        f"written {esc(time.strftime('%Y-%m-%d %H:%M'))} by histodetect "
        f"{esc(model.get('histodetect', '?'))}.</p>",
    ]
    if synthetic:
        parts.append(
            f'<div class="banner">{SYNTHETIC_BANNER}: this model was trained and/or evaluated '
            "on generated patches, not real tissue. Nothing here describes performance on real "
            "histopathology.</div>"
        )
    parts.append(
        '<p class="note">What the model does: for each 96x96 px H&amp;E patch it estimates the '
        "probability that metastatic tumour tissue lies inside the centre 32x32 px. Results are "
        "per patch, not per slide or per patient. For research and review only; not a "
        "diagnostic device.</p>"
    )
    parts.append(
        '<nav><a href="#glance">At a glance</a><a href="#data">Data</a>'
        '<a href="#training">Training</a><a href="#evaluation">Evaluation</a>'
        '<a href="#scope">Out of scope</a><a href="#explain">Explanations</a>'
        '<a href="#config">Configuration</a><a href="#versions">Versions</a></nav>'
    )
    own = {s: e for s, e in evals.items() if not _is_external(e)}
    split, ev = next(iter((own or evals).items()), (None, None))
    parts.append('<h2 id="glance">At a glance</h2>')
    if ev is None:
        parts.append(missing("Not evaluated yet: no metrics_<split>.json in the run folder."))
        return parts
    m, ci = ev.get("metrics", {}), ev.get("intervals", {})
    cards = [
        ("auc", "ROC AUC"),
        ("sensitivity", "Sensitivity"),
        ("specificity", "Specificity"),
        ("accuracy", "Accuracy"),
    ]
    parts.append('<div class="cards">')
    for key, label in cards:
        parts.append(
            f'<div class="card"><div class="k">{esc(label)} ({esc(_column(split, ev))})</div>'
            f'<div class="v">{esc(num(m.get(key)))}</div>'
            f'<div class="ci">95% CI {esc(interval(ci.get(key)))}</div></div>'
        )
    parts.append("</div>")
    parts.append(
        f"<p>On {_scored(split, ev)}, at threshold "
        f"{esc(num(ev.get('thresholds', {}).get('run'), 3))}"
        f"{' (' + SYNTHETIC_BANNER + ')' if ev.get('synthetic') else ''}.</p>"
    )
    return parts


def _is_external(ev: dict) -> bool:
    """Whether an evaluation scored other data than the run was trained on (as recorded)."""
    return (ev.get("data") or {}).get("run_data") is False


def _column(split: str, ev: dict) -> str:
    """A short name for an evaluation: its split, after the data's folder name if external."""
    path = (ev.get("data") or {}).get("path")
    return f"{Path(path).name} {split}" if _is_external(ev) and path else split


def _scored(split: str, ev: dict) -> str:
    """HTML naming what an evaluation scored: how many patches, which split, which folder."""
    data = ev.get("data") or {}
    n = esc(num(ev.get("n")))
    if not data.get("path"):
        # Evaluations written before evaluate recorded its data: say so rather than guess.
        return (
            f"{n} {esc(split)} patches (which data was not recorded: re-run histodetect "
            "evaluate to name it)"
        )
    which = "every labelled patch" if split == "all" else f"the {split} split (as the run saw it)"
    kind = f"{data['kind']} data" if data.get("kind") else "data"
    whose = (
        "external: another data set than the one the run was trained on"
        if _is_external(ev)
        else "the run's own data"
    )
    return f"{n} patches, {esc(which)} of {esc(kind)} at <code>{esc(data['path'])}</code> ({whose})"


def _section_data(data: dict | None, evals: dict[str, dict]) -> list[str]:
    parts = ['<h2 id="data">Data</h2>']
    external = [
        f"<li>{esc(_column(split, ev))}: {_scored(split, ev)}</li>"
        for split, ev in evals.items()
        if _is_external(ev)
    ]
    if external:
        external = [
            "<p>Also evaluated on other data, shown apart under Evaluation:</p>",
            f"<ul>{''.join(external)}</ul>",
        ]
    if data is None:
        return [*parts, missing("data.json is missing from the run folder."), *external]
    source = data.get("source", {})
    parts.append(
        "<p>The data the run was trained and validated on. "
        f"Source: {esc(source.get('kind', '?'))} data at "
        f"<code>{esc(source.get('path', '?'))}</code>, packed into "
        f"<code>{esc(data.get('store', '?'))}</code>. Fingerprint "
        f"<code>{esc(str(data.get('fingerprint', '?'))[:16])}</code>"
        f"{' - ' + SYNTHETIC_BANNER if data.get('synthetic') else ''}.</p>"
    )
    counts = data.get("counts", {})
    rows, totals = [], {"0": 0, "1": 0}
    for split, by_label in counts.items():
        normal, tumour = int(by_label.get("0", 0)), int(by_label.get("1", 0))
        other = sum(int(v) for k, v in by_label.items() if k not in ("0", "1"))
        totals["0"] += normal
        totals["1"] += tumour
        total = normal + tumour + other
        share = f"{tumour / (normal + tumour):.1%}" if normal + tumour else "n/a"
        rows.append([esc(split), num(normal), num(tumour), num(other), num(total), esc(share)])
    header = ["split", "normal (0)", "tumour (1)", "unlabelled", "total", "tumour share"]
    parts.append(table(header, rows))
    return [*parts, *external]


def _section_training(run: Path, training: dict | None, config: dict | None) -> list[str]:
    parts = ['<h2 id="training">Training</h2>']
    if training:
        valid = training.get("valid", {})
        rows = [
            ["validation ROC AUC (best checkpoint)", num(valid.get("auc"))],
            ["validation accuracy at 0.5", num(valid.get("accuracy"))],
            ["validation patches", num(valid.get("n"))],
            ["epochs run", num(training.get("epochs_run"))],
            ["optimiser steps", num(training.get("optimizer_steps"))],
            ["training time (s)", num(training.get("seconds"), 0)],
            ["training speed (patches/s)", num(training.get("train_images_per_s"), 0)],
            ["resumed after an interruption", esc(training.get("resumed", "?"))],
        ]
        parts.append(table(["", "value"], rows))
    else:
        parts.append(missing("metrics.json is missing: the run may not have finished."))
    if config:
        parts.append(f"<p>{esc(_config_summary(config))}</p>")
    parts.append(
        img(
            run / "curves.png",
            "training curves",
            "Loss, accuracy and ROC AUC per epoch on the training and validation splits, and "
            "the training loss per optimiser step. Diverging train/valid curves mean "
            "overfitting.",
        )
    )
    return parts


def _section_cross_validation(run: Path, model: dict) -> list[str]:
    """An ensemble's members and, after ``cv``, each fold's AUC, OOF AUC and the holdout."""
    parts = ['<h2 id="training">Cross-validation ensemble</h2>']
    members = ", ".join(esc(m) for m in model.get("members", []))
    parts.append(f"<p>The mean probability of {len(model.get('members', []))} runs: {members}.</p>")
    cv = read_json(run.parent / "cv_metrics.json")
    if not cv:
        return [*parts, missing("cv_metrics.json is missing beside the ensemble folder.")]
    rows = [
        [f"fold {f['fold']}", num(f["auc"]), num(f["n_valid"]), num(f["optimizer_steps"])]
        for f in cv["folds"]
    ]
    parts.append(table(["", "out-of-fold ROC AUC", "patches", "optimiser steps"], rows))
    parts.append(
        f"<p>Folds {esc(cv['grouping'])}. Fold AUC mean ± std {num(cv['mean_auc'])} ± "
        f"{num(cv['std_auc'])}; all out-of-fold predictions together: ROC AUC "
        f"{num(cv['oof_auc'])} (95% CI {interval(cv['oof_interval'])}).</p>"
    )
    rows = [
        [f"TTA x{h['tta']}", num(h["ensemble"]), num(max(h["folds"].values())), num(h["n"])]
        for h in cv.get("holdout", [])
    ]
    if rows:
        header = ["held out of every fold", "ensemble ROC AUC", "best single fold", "patches"]
        parts.append(table(header, rows))
    return parts


def _config_summary(config: dict) -> str:
    model, train, data = (config.get(k, {}) for k in ("model", "train", "data"))
    bits = [
        f"architecture {model.get('arch', '?')}"
        + (" (ImageNet-pretrained)" if model.get("pretrained") else ""),
        f"{train.get('epochs', '?')} epochs",
        f"batch {data.get('batch_size', '?')}",
        f"learning rate {train.get('lr', '?')} ({train.get('optimizer', '?')}, "
        f"{train.get('schedule', '?')} schedule)",
        f"loss {train.get('loss', '?')}",
        f"centre crop {data.get('crop', '?')} px",
    ]
    return "Trained with " + ", ".join(bits) + "."


def _section_evaluation(run: Path, evals: dict[str, dict]) -> list[str]:
    parts = ['<h2 id="evaluation">Evaluation</h2>']
    if not evals:
        return [
            *parts,
            missing(
                f"No evaluation yet. Run: histodetect evaluate {run} --data DATA "
                "(or histodetect report RUN --data DATA, which evaluates first)."
            ),
        ]
    parts.append(
        "<p>Patch-level metrics at the run's decision threshold, with 95% percentile bootstrap "
        "intervals (patches resampled). Patches cut from the same slide are correlated, so "
        "the intervals are optimistic when many patches share a slide.</p>"
    )
    own = {s: e for s, e in evals.items() if not _is_external(e)}
    if own:
        parts.append("<h3>On the run's own data</h3>")
        parts.append(
            "<ul>"
            + "".join(f"<li>{esc(s)}: {_scored(s, e)}</li>" for s, e in own.items())
            + "</ul>"
        )
        parts.append(_metrics_table(own))
        for split, ev in own.items():
            parts += _split_details(run, split, ev)
    for split, ev in evals.items():
        if split in own:
            continue
        parts.append(f"<h3>External data: {esc(_column(split, ev))}</h3>")
        parts.append(
            f"<p>On {_scored(split, ev)}. The run's threshold is used as it is; other "
            f"thresholds and the temperature were chosen on {esc(ev.get('thresholds_from'))}."
            "</p>"
        )
        parts.append(_metrics_table({split: ev}))
        parts += _split_details(run, split, ev)
    return parts


def _metrics_table(evals: dict[str, dict]) -> str:
    """One row per metric (and calibration error), a value and 95% CI column per split."""
    splits = list(evals)
    header = ["metric"]
    for split in splits:
        ev = evals[split]
        tag = " SYNTHETIC" if ev.get("synthetic") else ""
        header += [
            f"{esc(_column(split, ev))} (n={num(ev.get('n'))}{tag})",
            "95% CI",
        ]
    header.append("meaning")
    rows = []
    for key, label, meaning in METRIC_ROWS:
        row = [esc(label)]
        for split in splits:
            ev = evals[split]
            row += [
                esc(num(ev.get("metrics", {}).get(key))),
                esc(interval(ev.get("intervals", {}).get(key))),
            ]
        rows.append([*row, f'<span class="dim">{esc(meaning)}</span>'])
    ece_row = ["Expected calibration error"]
    for split in splits:
        ece_row += [esc(num(evals[split].get("ece"))), ""]
    rows.append([*ece_row, '<span class="dim">gap between probability and frequency</span>'])
    return table(header, rows, last_left=True)


def _split_details(run: Path, split: str, ev: dict) -> list[str]:
    """One split: its thresholds table, calibrating temperature and evaluation figure."""
    parts = [f"<h4>{esc(_column(split, ev))}: thresholds and figures</h4>"]
    thresholds = _thresholds_table(ev)
    if thresholds:
        parts.append(thresholds)
        parts.append(
            '<p class="sub">Alternative thresholds are chosen on the validation split: '
            "Youden's J maximises sensitivity + specificity; the sensitivity threshold is "
            "the highest one that still finds that share of tumour patches.</p>"
        )
    temp = ev.get("temperature")
    if temp is not None:
        parts.append(
            f"<p>Temperature that would calibrate the probabilities: {esc(num(temp, 3))} "
            "(stored only when evaluated with --calibrate).</p>"
        )
    parts.append(
        img(
            run / f"evaluation_{split}.png",
            f"evaluation on {split}",
            "ROC curve, precision-recall curve, reliability diagram (calibration) and "
            "confusion matrix at the run's threshold.",
        )
    )
    return parts


def _thresholds_table(ev: dict) -> str | None:
    """Confusion counts, sensitivity and specificity at each stored threshold (None if none)."""
    thresholds = ev.get("thresholds", {})
    confusion = ev.get("confusion", {})
    rows = []
    for name, value in thresholds.items():
        c = confusion.get(name, {})
        tp, fp, tn, fn = (int(c.get(k, 0)) for k in ("tp", "fp", "tn", "fn"))
        sens = f"{tp / (tp + fn):.3f}" if tp + fn else "n/a"
        spec = f"{tn / (tn + fp):.3f}" if tn + fp else "n/a"
        rows.append(
            [
                esc(_threshold_name(name)),
                esc(num(value, 3)),
                num(tp),
                num(fn),
                num(tn),
                num(fp),
                sens,
                spec,
            ]
        )
    if not rows:
        return None
    return table(
        [
            "threshold",
            "value",
            "tumour found (TP)",
            "tumour missed (FN)",
            "normal cleared (TN)",
            "false alarms (FP)",
            "sensitivity",
            "specificity",
        ],
        rows,
    )


def _threshold_name(name: str) -> str:
    if name == "run":
        return "run (used by predict)"
    if name == "youden":
        return "Youden's J"
    if name.startswith("sensitivity_"):
        return f"sensitivity ≥ {name.removeprefix('sensitivity_')}"
    return name


def _section_explain(run: Path, explain: dict | None) -> list[str]:
    parts = ['<h2 id="explain">Explanations: hardest and least certain patches</h2>']
    folder = run / EXPLAIN_DIR
    if explain is None:
        return [
            *parts,
            missing(
                f"No explanations yet. Run: histodetect explain {run} --data DATA --out "
                f"{folder} (or histodetect report RUN --data DATA)."
            ),
        ]
    split = explain.get("split", "?")
    parts.append(
        f"<p>{esc(num(explain.get('misclassified')))} of {esc(num(explain.get('n_patches')))} "
        f"{esc(split)} patches are misclassified at threshold "
        f"{esc(num(explain.get('threshold'), 2))}"
        f"{' (' + SYNTHETIC_BANNER + ')' if explain.get('synthetic') else ''}. Each patch is "
        "shown beside its Grad-CAM map: regions that pushed the model towards "
        "<i>tumour</i> (red strongest), computed on the last convolutional feature maps and "
        "upsampled, so they are coarse. An untinted patch means no region argued for "
        "tumour. The white box is the labelled centre 32x32 px.</p>"
    )
    parts.append("<h3>Top losses (most confident mistakes)</h3>")
    parts.append(
        img(
            folder / "top_losses.png",
            "top losses",
            "Highest binary cross-entropy first; titles in red are misclassified.",
        )
    )
    rows = [
        [
            f"<code>{esc(e.get('id'))}</code>",
            esc(e.get("label")),
            esc(num(e.get("probability"), 3)),
            esc(num(e.get("loss"), 3)),
            "wrong" if e.get("predicted") != e.get("label") else "right",
        ]
        for e in explain.get("top_losses", [])
    ]
    if rows:
        parts.append(table(["patch id", "true label", "P(tumour)", "loss", "verdict"], rows))
    parts.append("<h3>Most uncertain (probability closest to the threshold)</h3>")
    parts.append(img(folder / "uncertain.png", "most uncertain patches"))
    return parts


def _section_config(run: Path) -> list[str]:
    parts = ['<h2 id="config">Configuration</h2>']
    path = run / "config.yaml"
    if not path.exists():
        return [*parts, missing("config.yaml is missing from the run folder.")]
    return [
        *parts,
        "<p>config.yaml of the run (everything training depended on):</p>",
        f'<pre class="cfg">{esc(path.read_text(encoding="utf-8"))}</pre>',
    ]


def _section_versions(environment: dict | None) -> list[str]:
    parts = ['<h2 id="versions">Software and hardware</h2>']
    if environment is None:
        return [*parts, missing("environment.json is missing from the run folder.")]
    rows = [
        [esc(k), esc(", ".join(map(str, v)) if isinstance(v, list) else v) or "none"]
        for k, v in environment.items()
    ]
    return [*parts, table(["", "version"], rows, left=2)]


def _eval_splits(run: Path) -> dict[str, dict]:
    """metrics_<split>.json files of the run, validation first, then test, then the rest."""
    found = {p.stem.removeprefix("metrics_"): p for p in run.glob("metrics_*.json")}
    order = sorted(found, key=lambda s: ({"valid": 0, "test": 1}.get(s, 2), s))
    out = {}
    for split in order:
        ev = read_json(found[split])
        if ev is not None:
            out[split] = ev
    return out


def render_report(run: str | Path) -> str:
    """The report page of a run folder, from the files already in it."""
    import yaml

    run = Path(run)
    model = read_json(run / "model.json") or {}
    data = read_json(run / "data.json")
    evals = _eval_splits(run)
    explain = read_json(run / EXPLAIN_DIR / "explain.json")
    config = None
    if (run / "config.yaml").exists():
        config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    synthetic = bool(
        model.get("synthetic")
        or (data or {}).get("synthetic")
        or any(ev.get("synthetic") for ev in evals.values())
        or (explain or {}).get("synthetic")
    )
    title = f"{run.name}: tumour detection report" + (f" ({SYNTHETIC_BANNER})" if synthetic else "")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>{CSS}</style>",
        "</head><body><main>",
        *_section_header(run, model, synthetic, evals),
        *_section_data(data, evals),
        *(
            _section_cross_validation(run, model)
            if "members" in model
            else _section_training(run, read_json(run / "metrics.json"), config)
        ),
        *_section_evaluation(run, evals),
        *section_scope(evals),
        *_section_explain(run, explain),
        *_section_config(run),
        *_section_versions(read_json(run / "environment.json")),
        "<footer>Generated by histodetect from the files of the run folder; this page is "
        "self-contained (images embedded) and works offline.</footer>",
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"


def build_report(run: str | Path, data: str | Path | None = None) -> Path:
    """Write ``RUN/report.html``: one self-contained page for a pathologist or reviewer.

    Collects the run's model description, data summary, training curves, metrics with 95%
    intervals, evaluation figures, Grad-CAM galleries, configuration and versions. Every image
    is embedded; the page needs no network and no JavaScript.

    Args:
        run: a finished run folder.
        data: the run's data (Kaggle folder, PCam folder or store). When given, a run without
            any ``metrics_<split>.json`` is evaluated first (on its validation split; a cv
            ensemble on the patches held out of all folds), and one without ``explain/`` gets
            its Grad-CAM galleries made.

    Returns:
        The path of the report.
    """
    run = Path(run)
    if not (run / "model.json").exists():
        raise HistodetectError(f"{run}: no model.json; not a finished training run folder.")
    if data is not None:
        from histodetect.data.folds import scoring_split
        from histodetect.data.loaders import run_data_config

        split = scoring_split(run_data_config(run))
        # An external evaluation does not stand in for the run's own.
        if all(_is_external(ev) for ev in _eval_splits(run).values()):
            from histodetect.inference.evaluate import evaluate

            evaluate(run, data, split)
        if not (run / EXPLAIN_DIR / "explain.json").exists():
            from histodetect.inference.explain import explain_run

            explain_run(run, data, run / EXPLAIN_DIR, split)
    out = run / REPORT_FILE
    write_atomic(out, render_report(run).encode("utf-8"))
    return out
