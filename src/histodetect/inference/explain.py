"""Grad-CAM explanations: where in a patch the model found tumour evidence, and its worst cases."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histodetect import CENTRE
from histodetect.errors import HistodetectError
from histodetect.files import write_atomic
from histodetect.inference.predictor import Predictor

EPS = 1e-7
GRID_COLUMNS = 4  # patch/overlay pairs per row in the galleries
READ_CHUNK = 4096  # patches read from the store per prediction pass


def _contains_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def _is_bare_leaf(module: nn.Module) -> bool:
    """An activation, pooling, dropout or identity: no children and no parameters."""
    return next(module.children(), None) is None and next(module.parameters(), None) is None


def target_layer(model: nn.Module, size: int = 96) -> nn.Module:
    """The module whose output is the backbone's last feature map, where Grad-CAM looks.

    Rule: trace one forward pass of ``backbone.forward_features`` (the 4-D feature maps just
    before global pooling) on a ``size`` x ``size`` probe. Among the modules that return exactly
    that final tensor, unmodified by later in-place operations, take the innermost one that is
    more than a bare activation, pooling or identity layer: SmallCNN's ``blocks[-1]``, a
    ResNet's ``layer4[-1]``, a ConvNeXt's last block, an EfficientNet's ``bn2`` (after
    ``conv_head``); failing that, the innermost one (Xception's final ``act4``). If the final
    map comes from a functional operation instead, fall back to the last module with a 4-D
    output that contains a ``Conv2d``.

    Args:
        model: a :class:`~histodetect.models.Classifier` (or a bare backbone).
        size: side of the probe input, i.e. the size the model sees (its centre crop).

    Raises:
        HistodetectError: when the backbone has no ``forward_features`` or no 4-D feature map.
    """
    backbone = getattr(model, "backbone", model)
    if not hasattr(backbone, "forward_features"):
        raise HistodetectError(
            f"{type(backbone).__name__} has no forward_features(): cannot locate its feature maps."
        )
    seen: list[tuple[nn.Module, torch.Tensor, int]] = []

    def record(module: nn.Module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            seen.append((module, output, output._version))

    hooks = [m.register_forward_hook(record) for m in backbone.modules() if m is not backbone]
    was_training = model.training
    model.eval()  # the probe must not touch batch-norm statistics
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            final = backbone.forward_features(torch.zeros(1, 3, size, size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if not isinstance(final, torch.Tensor) or final.dim() != 4:
        raise HistodetectError(
            f"{type(backbone).__name__}.forward_features() does not return 4-D feature maps."
        )
    # The same tensor, not modified in place afterwards (a ResNet's bn2 output is the storage
    # that `+= shortcut` and an in-place ReLU later turn into the block's output).
    same = [
        m
        for m, out, version in seen
        if out.shape == final.shape
        and out.data_ptr() == final.data_ptr()
        and version == final._version
    ]
    for module in same:  # completion order: innermost first
        if not _is_bare_leaf(module):
            return module
    if same:  # e.g. a final ReLU module applied after the last block
        return same[0]
    with_conv = [m for m, _, _ in seen if _contains_conv(m)]
    if with_conv:
        return with_conv[-1]
    raise HistodetectError(f"{type(backbone).__name__}: no convolutional layer found.")


def _check_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.dim() != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise HistodetectError(
            f"expected uint8 patches shaped (N, H, W, 3), got {tuple(images.shape)} {images.dtype}."
        )
    return images


def gradcam(
    predictor: Predictor,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 32,
    layer: nn.Module | None = None,
) -> np.ndarray:
    """Grad-CAM heat maps of the tumour logit, in the frame of the input patches.

    Uses captum's ``LayerGradCam`` on :func:`target_layer`, in eval mode and without TTA. Each
    map is ReLU'd, upsampled bilinearly to the size the model sees, put back into the full patch
    (zeros outside the model's centre crop) and divided by its maximum.

    Args:
        predictor: a loaded :class:`~histodetect.predict.Predictor`.
        images: (N, H, W, 3) uint8 patches (96 x 96 for PCam).
        batch_size: patches per backward pass (small keeps CPU memory low).
        layer: the layer to explain; default :func:`target_layer`. An earlier block gives finer
            but less class-specific maps (SmallCNN's last maps are only 3x3 at 96 px). An
            ensemble always uses each member's own :func:`target_layer`.

    Returns:
        float32 array (N, H, W) in [0, 1]; 1 marks the strongest evidence for tumour within
        each patch, and an all-zero map means no region pushed the prediction towards tumour.
    """
    images = _check_images(images)
    n, height, width = images.shape[:3]
    model = predictor.model.eval()
    crop_h, crop_w = height, width
    if predictor.crop < min(height, width):  # as data.centre_crop: only when smaller
        crop_h = crop_w = predictor.crop
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    explainers = _explainers(model, layer, min(crop_h, crop_w))
    out = np.zeros((n, height, width), np.float32)
    for start in range(0, n, batch_size):
        batch = images[start : start + batch_size].to(predictor.device)
        x = predictor.prepare(batch)
        # An ensemble's map is its members' maps, each scaled to 1, averaged with its weights.
        up = sum(w * _cam(cam, x, (crop_h, crop_w)) for w, cam in explainers)
        out[start : start + len(batch), top : top + crop_h, left : left + crop_w] = _unit(up)
    return out


def _explainers(model: nn.Module, layer: nn.Module | None, size: int) -> list[tuple[float, Any]]:
    """(weight, captum LayerGradCam) per model: one for a classifier, one per ensemble member."""
    from captum.attr import LayerGradCam

    members = getattr(model, "members", None)
    if members is None:
        layer = layer if layer is not None else target_layer(model, size)
        return [(1.0, LayerGradCam(lambda x: model(x).unsqueeze(1), layer))]
    return [
        (
            float(model.weights[i]),
            LayerGradCam(
                lambda x, i=i: model.member_logits(i, x).unsqueeze(1), target_layer(m, size)
            ),
        )
        for i, m in enumerate(members)
    ]


def _cam(cam: Any, x: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """One explainer's ReLU'd Grad-CAM, upsampled to ``size`` and scaled to a maximum of 1."""
    from captum.attr import LayerAttribution

    with torch.enable_grad():
        attr = cam.attribute(x, target=0, relu_attributions=True)
    up = LayerAttribution.interpolate(attr.detach().float(), size, "bilinear")
    return _unit(up[:, 0].clamp_min(0).cpu().numpy())


def _unit(maps: np.ndarray) -> np.ndarray:
    """Each map divided by its maximum (all-zero maps stay zero), clipped to [0, 1]."""
    peak = maps.max(axis=(1, 2), keepdims=True)
    scaled = np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)
    return np.clip(scaled, 0, 1).astype(np.float32)


def overlay(
    image: np.ndarray, heat: np.ndarray, alpha: float = 0.6, cmap: str = "jet"
) -> np.ndarray:
    """Blend a colour-mapped heat map over a patch and outline the labelled centre box.

    The colour's weight grows with the heat (``alpha * sqrt(heat)``), so tissue where the model
    found no evidence stays visible as it is, and an all-zero map leaves the patch unchanged.

    Args:
        image: (H, W, 3) uint8 patch.
        heat: (H, W) map in [0, 1], e.g. one row of :func:`gradcam`.
        alpha: weight of the colour map where the heat is 1 (0 = patch only).
        cmap: a matplotlib colour map name.

    Returns:
        (H, W, 3) uint8 image; the centre 32x32 box (pixels [32, 64) of a 96 px patch, scaled
        for other sizes) is outlined in white.
    """
    import matplotlib

    image = np.asarray(image)
    heat = np.asarray(heat, dtype=np.float32)
    if image.ndim != 3 or image.shape[-1] != 3 or heat.shape != image.shape[:2]:
        raise HistodetectError(
            f"overlay needs an (H, W, 3) image and an (H, W) map, got {image.shape} and "
            f"{heat.shape}."
        )
    heat = np.clip(heat, 0, 1)
    colour = matplotlib.colormaps[cmap](heat)[..., :3] * 255.0
    weight = (alpha * np.sqrt(heat))[..., None]
    out = np.rint((1 - weight) * image.astype(np.float32) + weight * colour)
    out = out.clip(0, 255).astype(np.uint8)
    height, width = heat.shape
    (r0, r1), (c0, c1) = (
        (round(CENTRE[0] * side / 96), round(CENTRE[1] * side / 96)) for side in (height, width)
    )
    out[r0, c0:c1] = out[r1 - 1, c0:c1] = 255
    out[r0:r1, c0] = out[r0:r1, c1 - 1] = 255
    return out


def _save_figure(fig, path: Path, dpi: int = 110) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buf.getvalue())


def _pair(image: np.ndarray, heat: np.ndarray, gap: int = 4) -> np.ndarray:
    """The patch and its overlay side by side, separated by a white gap."""
    spacer = np.full((image.shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([image, spacer, overlay(image, heat)], axis=1)


def _gallery(
    images: np.ndarray,
    heats: np.ndarray,
    entries: list[dict],
    title: str,
    threshold: float,
    path: Path,
) -> None:
    """A grid of (patch, Grad-CAM) pairs titled with id, label, probability and loss."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(GRID_COLUMNS, max(len(entries), 1))
    rows = max(math.ceil(len(entries) / cols), 1)
    height = 2.05 * rows + 0.8
    fig = Figure(figsize=(3.1 * cols, height))
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, heat, e in zip(axes, images, heats, entries, strict=False):
        ax.imshow(_pair(image, heat), interpolation="nearest")
        wrong = e["predicted"] != e["label"]
        ax.set_title(
            f"{e['id']}\nlabel {e['label']}  p={e['probability']:.3f}  loss {e['loss']:.2f}"
            + ("  WRONG" if wrong else ""),
            fontsize=7,
            color="#b00000" if wrong else "black",
        )
    if not entries:
        axes[0].text(0.5, 0.5, "no patches", ha="center", va="center")
    fig.suptitle(title, fontsize=10, color="#b00000" if "SYNTHETIC" in title else "black")
    fig.text(
        0.5,
        0.06 / height,
        "left: patch; right: Grad-CAM of the tumour logit (red = strongest evidence, "
        "untinted = none), white box = labelled centre 32x32 px; p = P(tumour), "
        f"WRONG = misclassified at threshold {threshold:.2f}",
        ha="center",
        va="bottom",
        fontsize=7,
    )
    fig.tight_layout(rect=(0, 0.22 / height, 1, 1))
    _save_figure(fig, path)


def _bce(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    q = np.clip(p.astype(np.float64), EPS, 1 - EPS)
    return -(y * np.log(q) + (1 - y) * np.log(1 - q))


def explain_run(
    run: str | Path,
    data: str | Path,
    out: str | Path,
    split: str = "valid",
    n: int = 16,
    tta: int = 1,
) -> dict:
    """Galleries of a run's worst and least certain patches of one split, with Grad-CAM.

    Predicts every labelled patch of ``split`` (with ``tta`` views), then picks the ``n``
    highest binary cross-entropy losses (the most confident mistakes) and the ``n``
    probabilities closest to the run's threshold. Writes, atomically, ``out/top_losses.png``,
    ``out/uncertain.png`` and ``out/explain.json`` (id, label, probability, loss of each).
    Grad-CAM maps are computed on the plain view (no TTA).

    Args:
        run: a finished run folder.
        data: Kaggle folder, PCam folder or packed store (packed into the cache if needed,
            with the run's own ``valid_fraction`` and ``split_seed``).
        out: folder to write into (created).
        split: "valid" (default) or "test" (when the store has labelled test patches).
        n: patches per gallery.
        tta: dihedral views averaged for the probabilities (1, 2, 4 or 8).

    Returns:
        The content of ``explain.json``.
    """
    from histodetect.data.loaders import labelled_split

    run, out = Path(run), Path(out)
    if n < 1:
        raise HistodetectError(f"--n must be at least 1, got {n}.")
    predictor = Predictor.from_run(run)
    store, idx = labelled_split(run, data, split)
    probs = np.concatenate(
        [
            predictor.predict_proba(store.read(idx[s : s + READ_CHUNK]), tta=tta)
            for s in range(0, len(idx), READ_CHUNK)
        ]
    )
    labels = store.labels[idx].astype(np.int64)
    losses = _bce(labels, probs)
    threshold = predictor.threshold
    predicted = (probs >= threshold).astype(np.int64)
    picks = {
        "top_losses": np.argsort(-losses, kind="stable")[:n],
        "uncertain": np.argsort(np.abs(probs - threshold), kind="stable")[:n],
    }
    wanted = np.unique(np.concatenate(list(picks.values())))
    images = store.read(idx[wanted])
    heats = gradcam(predictor, images)
    where = {int(k): i for i, k in enumerate(wanted)}

    def entry(k: int) -> dict:
        return {
            "id": str(store.ids[idx[k]]),
            "label": int(labels[k]),
            "probability": float(probs[k]),
            "loss": float(losses[k]),
            "predicted": int(predicted[k]),
        }

    tag = " - SYNTHETIC DATA" if store.synthetic else ""
    arch = predictor.meta.get("arch", "?")
    titles = {
        "top_losses": f"{run.name} ({arch}): top {len(picks['top_losses'])} losses on {split} "
        f"(highest binary cross-entropy){tag}",
        "uncertain": f"{run.name} ({arch}): {len(picks['uncertain'])} most uncertain on {split} "
        f"(probability closest to {threshold:.2f}){tag}",
    }
    summary = {
        "run": str(run),
        "data": str(data),
        "split": split,
        "n_patches": len(idx),
        "misclassified": int((predicted != labels).sum()),
        "threshold": threshold,
        "tta": tta,
        "arch": arch,
        "synthetic": bool(store.synthetic),
        "files": ["top_losses.png", "uncertain.png", "explain.json"],
    }
    for name, chosen in picks.items():
        entries = [entry(int(k)) for k in chosen]
        rows = [where[int(k)] for k in chosen]
        _gallery(images[rows], heats[rows], entries, titles[name], threshold, out / f"{name}.png")
        summary[name] = entries
    write_atomic(out / "explain.json", json.dumps(summary, indent=2).encode())
    return summary


def explain_image(run: str | Path, image_path: str | Path, out_png: str | Path) -> float:
    """Explain one patch file: a figure of the patch and its Grad-CAM overlay.

    Args:
        run: a finished run folder.
        image_path: a 96x96 RGB patch (.tif, .png or .jpg).
        out_png: the figure to write (atomically).

    Returns:
        P(tumour in the centre 32x32), exactly as ``predict`` computes it without TTA.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from histodetect.data.patchio import decode_patch

    image_path, out_png = Path(image_path), Path(out_png)
    predictor = Predictor.from_run(run)
    image = np.array(decode_patch(image_path))  # writable, as torch wants
    prob = float(predictor.predict_proba(image[None])[0])
    heat = gradcam(predictor, image[None])[0]
    threshold = predictor.threshold
    verdict = "tumour" if prob >= threshold else "no tumour"

    fig = Figure(figsize=(6.6, 3.7))
    FigureCanvasAgg(fig)
    ax = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 0.05]})
    lo, hi = CENTRE
    ax[0].imshow(image, interpolation="nearest")
    ax[0].add_patch(Rectangle((lo - 0.5, lo - 0.5), hi - lo, hi - lo, fill=False, ec="white", lw=1))
    ax[0].set_title("patch (box: labelled centre)", fontsize=8)
    ax[1].imshow(overlay(image, heat), interpolation="nearest")
    ax[1].set_title("Grad-CAM of the tumour logit", fontsize=8)
    for a in ax[:2]:
        a.axis("off")
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), "jet"), cax=ax[2])
    bar.ax.tick_params(labelsize=7)
    bar.set_label("relative evidence for tumour", fontsize=7)
    synthetic = " (model trained on SYNTHETIC DATA)" if predictor.meta.get("synthetic") else ""
    fig.suptitle(
        f"{image_path.name}\nP(tumour) = {prob:.3f}: {verdict} at threshold {threshold:.2f}"
        + synthetic,
        fontsize=9,
    )
    fig.tight_layout()
    _save_figure(fig, out_png)
    return prob
