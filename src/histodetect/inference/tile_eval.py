"""`evaluate --mpp`: labelled tiles of another size and resolution, scored per tile."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from histodetect.errors import BadInputError, HistodetectError, describe_problems
from histodetect.inference.evaluate import (
    Evaluation,
    evaluate_probabilities,
    runs_and_out,
    save_evaluation,
    scope_metrics,
)

SPLIT = "tiles"  # written as metrics_tiles.json: never the run's own data


def evaluate_tiles(
    runs: str | Path | list[str | Path],
    data: str | Path,
    mpp: float,
    tta: int = 1,
    n_boot: int = 1000,
    weights: list[float] | None = None,
    out: str | Path | None = None,
) -> Evaluation:
    """Score labelled tiles at ``mpp`` µm/px in a Kaggle-layout folder (``train/``, labels in
    ``train_labels.csv``).

    Each tile is resampled to the model's resolution and cut into patches as ``predict --mpp``
    does. A tile's probability is the highest of its patches' (a tile is tumour when any part
    of it is); its out-of-scope score the median of theirs (out of scope when most of it is).
    Thresholds and the temperature come from the run's own validation data, as for any
    external set. Writes ``metrics_tiles.json`` and ``evaluation_tiles.png``.
    """
    from histodetect.data.sources import open_kaggle
    from histodetect.data.tiles import tile_patches
    from histodetect.inference.predictor import Predictor
    from histodetect.inference.validation import own_validation

    runs, out = runs_and_out(runs, out)
    source = open_kaggle(Path(data))
    rows = np.flatnonzero(source.labels >= 0)
    if not len(rows):
        raise HistodetectError(f"{data}: no labelled tiles (train/ and train_labels.csv).")
    cut = tile_patches([Path(source.files[i]) for i in rows], mpp)
    if cut.problems:
        raise BadInputError(
            f"{len(cut.problems)} tile(s) of {data} cannot be used:\n"
            + describe_problems(cut.problems),
            cut.problems,
        )
    predictor = Predictor.from_runs(runs, weights)
    patch_p, patch_scores = predictor.predict_and_score(cut.images, tta=tta)
    # Every tile gave patches (else a problem above), in file order: one run of rows each.
    starts = np.flatnonzero(np.diff(cut.tiles, prepend=-1))
    p = np.maximum.reduceat(patch_p, starts)
    y = source.labels[rows].astype(np.int64)
    calibration, source_note = own_validation(predictor, runs, None, tta)
    ev = evaluate_probabilities(
        y,
        p,
        SPLIT,
        predictor.threshold,
        tta,
        n_boot,
        source.synthetic,
        calibration,
        thresholds_from=source_note,
        choose=False,
        notes=(
            f"{len(rows)} tiles at {mpp} µm/px cut into {len(cut.ids)} patches; a tile's "
            "probability is its highest patch's",
        ),
    )
    scores = None
    if patch_scores is not None:
        scores = np.array([np.median(part) for part in np.split(patch_scores, starts[1:])])
    data_note = {"path": str(Path(data).resolve()), "kind": "tiles", "mpp": mpp}
    ev = replace(ev, data={**data_note, "split": SPLIT, "n": len(y), "run_data": False})
    ev = replace(ev, scope=scope_metrics(predictor, scores, y, p))
    title = f"{out.name} on {Path(data).name}: {len(y)} tiles at {mpp} µm/px, TTA x{tta}"
    save_evaluation(ev, y, p, out, title)
    return ev
