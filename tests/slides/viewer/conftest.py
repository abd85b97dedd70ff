"""Slide map folders for the viewer's tests: the real CMU-1 and a SYNTHETIC slide, each mapped
by `histodetect slide` with an untrained model (the viewer is about plumbing and alignment)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.slides.conftest import export_run

CMU1 = Path(__file__).resolve().parents[3].parent / "shared" / "slides" / "CMU-1-Small-Region.svs"


def map_slides(run: Path, slides: list[Path], out: Path) -> Path:
    """``histodetect slide RUN SLIDES --out OUT`` in-process; returns OUT."""
    from histodetect.inference.predictor import Predictor
    from histodetect.slides.maps.slide import analyse_slide

    predictor = Predictor.from_run(run, "cpu")
    for slide in slides:
        analyse_slide(predictor, slide, out / Path(slide).stem, progress=False)
    return out


def make_cmu1_maps(root: Path) -> Path:
    """MAPS folder with the real CMU-1 mapped by a spread, untrained smallfcn (a few seconds);
    skips the test when the shared slide is absent."""
    if not CMU1.is_file():
        pytest.skip(f"real slide not found at {CMU1} (only present in CI/dev)")
    run = export_run(root / "run", "smallfcn")
    return map_slides(run, [CMU1], root / "maps")


def make_synthetic_maps(root: Path) -> tuple[Path, Path]:
    """(MAPS, ANNOTATIONS): one SYNTHETIC slide with planted tumours from slidesynth, mapped."""
    from histodetect.slides.synthetic.dataset import write_synthetic_set

    records = write_synthetic_set(root / "syn", n=1, tumour_fraction=1.0, size=(1536, 1024))
    run = export_run(root / "run-syn", "smallfcn")
    maps = map_slides(run, [records[0]["slide"]], root / "syn-maps")
    return maps, root / "syn" / "annotations"


@pytest.fixture(scope="module")
def cmu1_maps(tmp_path_factory) -> Path:
    return make_cmu1_maps(tmp_path_factory.mktemp("cmu1"))


@pytest.fixture(scope="module")
def synthetic_maps(tmp_path_factory) -> tuple[Path, Path]:
    return make_synthetic_maps(tmp_path_factory.mktemp("synthetic"))
