"""Out-of-scope score: how unlike the run's training patches a patch is, in colour and texture.

A patch is described by several descriptor sets: each of the backbone's first stages gives one
(per-channel mean and standard deviation of its feature maps: stain and texture as the model
sees them), and the patch's own pixels give two model-free ones (a uniform LBP histogram and
GLCM properties: ``histodetect.data.texture``). Per set, the descriptors are standardised, and
class-conditional Gaussians with one shared, shrunk (Ledoit-Wolf) covariance are fitted on the
training patches (Lee et al. 2018); a patch's set score is its Mahalanobis distance to the
nearer class, on a log scale standardised on the validation split; the score is their sum. The
threshold is the validation split's ``quantile`` (95 % of in-distribution patches are in scope
by construction).

Why these sets, measured on REAL data (benchmarks/scope_sets.py over six 20-minute runs;
benchmarks/results/scope.txt): validation patches vs the resampled tiles of ``../shared/ood``
gave AUROC 0.59 on the pooled last-stage features (the usual choice), 0.71-0.87 on the first
three stages, and 0.84-0.90 with the LBP and GLCM sets, better on every run; tissue patches of
the CMU-1 slide flagged 78-96 % instead of 72-82 %. The price: 6-12 % instead of 6-8 % of
held-out patches resampled to 0.5 um/px and back are flagged. Statistics written before the
texture sets keep scoring with their stages alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from histodetect.errors import HistodetectError

SCOPE_FILE = "scope.safetensors"
STAGES = 3  # the first stages: colour and texture, before the features specialise to tumour
TEXTURE = ("lbp", "glcm")  # the model-free descriptor sets (histodetect.data.texture)


def stage_modules(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's first ``STAGES`` stages, in order (its whole self when it has none known)."""
    info = getattr(backbone, "feature_info", None)
    if info is not None:  # timm
        mods = [backbone.get_submodule(f["module"]) for f in info]
    elif hasattr(backbone, "stem") and hasattr(backbone, "blocks"):  # smallcnn
        mods = [backbone.stem, *backbone.blocks]
    elif hasattr(backbone, "stages"):  # smallfcn
        mods = list(backbone.stages)
    elif hasattr(backbone, "features"):  # densecnn
        mods = [m for m in backbone.features if isinstance(m, nn.Conv2d)]
    else:
        mods = [backbone]
    return mods[:STAGES]


class StageCapture:
    """Hooks on a model's first backbone stages: after each forward pass, ``collect`` keeps the
    patches' descriptor sets (per stage, channel means and standard deviations of the feature
    maps; with ``texture``, the LBP and GLCM sets of the uint8 patches too).

    Used as a context manager, so that the hooks never outlive the pass they serve.
    """

    def __init__(self, model: nn.Module, texture: bool) -> None:
        if not hasattr(model, "backbone"):
            raise HistodetectError(
                "out-of-scope statistics are fitted per run; fit each member of the ensemble."
            )
        self.stages = stage_modules(model.backbone)
        self.texture = texture
        self.seen: dict[int, torch.Tensor] = {}
        self.parts: dict[str, list[np.ndarray]] = {}
        self.hooks: list = []

    def __enter__(self) -> StageCapture:
        self.hooks = [
            m.register_forward_hook(lambda _m, _i, out, k=k: self.seen.__setitem__(k, out))
            for k, m in enumerate(self.stages)
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()

    def collect(self, batch: torch.Tensor) -> None:
        """Keep the descriptors of the last forward pass, whose uint8 NHWC input was ``batch``."""
        sets = {}
        for k in range(len(self.stages)):
            f = self.seen[k].float().flatten(2)
            sets[str(k)] = torch.cat([f.mean(2), f.std(2)], 1)
        if self.texture:
            from histodetect.data.texture import texture_descriptors

            sets |= texture_descriptors(batch)
        for name, d in sets.items():
            self.parts.setdefault(name, []).append(d.cpu().numpy())

    def descriptors(self) -> dict[str, np.ndarray]:
        """Per descriptor set (stage ``"0"``, ``"1"``...; ``"lbp"``, ``"glcm"``), an (N, D)
        array for every patch collected so far."""
        return {name: np.concatenate(parts) for name, parts in self.parts.items()}


def uses_texture(stats: dict[str, np.ndarray]) -> bool:
    """Whether the statistics score the texture sets (those written before them do not)."""
    return any(f"means{name}" in stats for name in TEXTURE)


def set_names(stats: dict[str, np.ndarray]) -> list[str]:
    """The descriptor sets the statistics score."""
    return sorted(k.removeprefix("means") for k in stats if k.startswith("means"))


@torch.inference_mode()
def descriptors(
    predictor, images: np.ndarray, *, texture: bool = True, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """The patches' descriptor sets by name (see ``StageCapture.descriptors``)."""
    with StageCapture(predictor.model, texture) as capture:
        for start in range(0, len(images), batch_size):
            batch = torch.as_tensor(images[start : start + batch_size]).to(predictor.device)
            predictor.model(predictor.prepare(batch))
            capture.collect(batch)
    return capture.descriptors()


def _distance(x: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Mahalanobis distance (squared) of each row of ``x`` to the nearest of ``means``."""
    d = [np.einsum("ij,jk,ik->i", x - m, precision, x - m) for m in means]
    return np.maximum(np.min(d, axis=0), 1e-12)


def fit_scope(
    predictor,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    valid_images: np.ndarray,
    quantile: float = 0.95,
) -> dict[str, np.ndarray]:
    """The run's scope statistics, per descriptor set: standardisation, class means, shared
    precision and log-score scale.

    Returns float32 arrays for ``scope.safetensors``, with the threshold as ``threshold``.
    """
    from sklearn.covariance import LedoitWolf

    stats: dict[str, np.ndarray] = {}
    valid = descriptors(predictor, valid_images)
    classes = [c for c in (0, 1) if (train_labels == c).any()]
    for name, feats in descriptors(predictor, train_images).items():
        # Standardised first: the shrinkage target is a multiple of the identity, which only
        # suits descriptors on one scale (GLCM contrast is in the tens, LBP shares below 1).
        centre, spread = feats.mean(0), _spread(feats)
        feats = (feats - centre) / spread
        means = np.stack([feats[train_labels == c].mean(0) for c in classes])
        centred = np.concatenate(
            [feats[train_labels == c] - means[i] for i, c in enumerate(classes)]
        )
        precision = LedoitWolf().fit(centred).precision_
        log_d = np.log(_distance((valid[name] - centre) / spread, means, precision))
        scale = np.array([log_d.mean(), log_d.std() + 1e-6])
        stats |= {
            f"centre{name}": centre,
            f"spread{name}": spread,
            f"means{name}": means,
            f"precision{name}": precision,
            f"scale{name}": scale,
        }
    stats = {k: np.asarray(v, np.float32) for k, v in stats.items()}
    # The threshold from the stored (float32) statistics: what every later score uses.
    threshold = np.quantile(score_descriptors(valid, stats), quantile)
    return stats | {"threshold": np.array([threshold, quantile], np.float32)}


def _spread(feats: np.ndarray) -> np.ndarray:
    """Per-column standard deviation to divide by; 1 for (nearly) constant columns, such as a
    channel no training patch activates, whose float noise would otherwise be magnified."""
    std = feats.std(0)
    floor = max(1e-3 * float(np.median(std)), 1e-6)
    return np.where(std > floor, std, 1.0)


def score_descriptors(descs: dict[str, np.ndarray], stats: dict[str, np.ndarray]) -> np.ndarray:
    """The summed, standardised log-distances of the descriptor sets the statistics score."""
    total = np.zeros(len(next(iter(descs.values()))))
    for name in set_names(stats):
        means, precision, scale = (
            stats[f"{n}{name}"].astype(np.float64) for n in ("means", "precision", "scale")
        )
        feats = descs[name].astype(np.float64)
        if f"centre{name}" in stats:  # statistics written before the sets were standardised
            feats = (feats - stats[f"centre{name}"]) / stats[f"spread{name}"]
        total += (np.log(_distance(feats, means, precision)) - scale[0]) / scale[1]
    return total


@torch.inference_mode()
def texture_sets(images: np.ndarray, device, batch_size: int = 256) -> dict[str, np.ndarray]:
    """The model-free texture sets of uint8 patches, batched on ``device``: the same for every
    run, so an ensemble computes them once for all its members."""
    from histodetect.data.texture import texture_descriptors

    parts = [
        texture_descriptors(torch.as_tensor(images[start : start + batch_size]).to(device))
        for start in range(0, len(images), batch_size)
    ]
    return {name: np.concatenate([part[name].cpu().numpy() for part in parts]) for name in TEXTURE}


def scope_scores(
    predictor,
    images: np.ndarray,
    stats: dict[str, np.ndarray],
    texture: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Each patch's out-of-scope score (higher = less like the training data).

    ``texture``: the patches' ``texture_sets`` when already computed (else computed here if
    the statistics score them).
    """
    wanted = uses_texture(stats)
    descs = descriptors(predictor, images, texture=wanted and texture is None)
    if wanted and texture is not None:
        descs |= texture
    return score_descriptors(descs, stats)


def save_scope(run: Path, stats: dict[str, np.ndarray]) -> None:
    """Write ``scope.safetensors`` atomically."""
    from safetensors.numpy import save

    from histodetect.files import write_atomic

    header = {"threshold_quantile": str(float(stats["threshold"][1]))}
    write_atomic(Path(run) / SCOPE_FILE, save(stats, metadata=header))


def load_scope(run: Path) -> dict[str, np.ndarray] | None:
    """The run's scope statistics, None when it has none (runs made before them).

    Raises:
        HistodetectError: the file exists but is damaged (named, in one line).
    """
    path = Path(run) / SCOPE_FILE
    if not path.exists():
        return None
    from safetensors.numpy import load_file

    try:
        stats = load_file(str(path))
        _check(stats)
    except Exception as exc:  # any damage: truncated file, wrong tensors, missing keys
        raise HistodetectError(f"{path}: damaged out-of-scope statistics ({exc!r}).") from None
    return stats


def _check(stats: dict[str, np.ndarray]) -> None:
    """Assert that ``stats`` is whole: known sets, consistent shapes, finite values."""
    names = set_names(stats)
    assert names, "no descriptor sets"
    assert set(names) <= {str(k) for k in range(STAGES)} | set(TEXTURE), f"sets {names}"
    assert set(TEXTURE) <= set(names) or not set(TEXTURE) & set(names), "half the texture"
    for name in names:
        d = stats[f"means{name}"].shape[1]
        assert stats[f"precision{name}"].shape == (d, d) and stats[f"scale{name}"].shape == (2,)
        standardised = [f"{f}{name}" in stats for f in ("centre", "spread")]
        assert all(standardised) or not any(standardised), f"centre or spread of {name}"
        if all(standardised):
            assert stats[f"centre{name}"].shape == stats[f"spread{name}"].shape == (d,)
            assert (stats[f"spread{name}"] > 0).all(), f"spread of {name}"
    assert stats["threshold"].shape == (2,)
    assert all(np.isfinite(v).all() for v in stats.values()), "values not finite"


def write_details(
    path: Path,
    ids: list[str],
    probs: np.ndarray,
    scores: np.ndarray | None,
    threshold: float | None,
) -> str:
    """Write ``id,probability,scope_score,in_scope`` for ``predict --details`` atomically.

    ``scores`` is None when the run has no statistics (the two columns stay empty); a NaN score
    (an unreadable patch) is left empty too.

    Returns:
        The line for the terminal: how many patches are out of scope, or why it is unknown.
    """
    import io

    from histodetect.files import write_atomic

    buf = io.StringIO()
    buf.write("id,probability,scope_score,in_scope\n")
    for k, pid in enumerate(ids):
        known = scores is not None and threshold is not None and not np.isnan(scores[k])
        score = f"{scores[k]:.4f}" if known else ""
        inside = ("no" if scores[k] > threshold else "yes") if known else ""
        buf.write(f"{pid},{float(probs[k]):.6f},{score},{inside}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buf.getvalue().encode())
    if scores is None or threshold is None:
        return (
            f"wrote {path}; out-of-scope scores unavailable: the run has no scope statistics "
            "(trained before them: `histodetect scope RUN --data DATA` fits them; an ensemble "
            "needs them in every member)"
        )
    n = int(np.sum(scores > threshold))
    return (
        f"wrote {path}; {n} of {len(ids)} patches ({n / max(len(ids), 1):.1%}) are OUT OF "
        "SCOPE: unlike the training data (other tissue, stain or scanner); their probabilities "
        "are not to be trusted"
    )
