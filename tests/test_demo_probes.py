"""The demo-model probes run on a v2 model folder."""

import pytest

from analysis.demo import probes, train
from analysis.demo.data import CONTROLS_V2, load_photos, load_set
from analysis.model import load_model


@pytest.fixture(scope="module")
def v2_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2")
    train.main(["--out", str(root / "model"), "--work-dir", str(root / "run"), "--steps", "1", "--batch-size", "2",
                "--warmup", "1", "--device", "cpu", "--data", "v2"])
    return load_model(root / "model")


@pytest.mark.parametrize("images", [load_set(CONTROLS_V2), load_photos(recipe="v1")], ids=["control", "v1 photo"])
def test_dori_toward_an_image_reports_before_and_after(v2_model, images):
    captions, tensors = images
    rows = probes.dori_toward(v2_model, captions, tensors, [1], steps=1)
    assert list(rows) == [captions[1]]
    row = rows[captions[1]]
    assert set(row) == {"rate_before", "similarity_before", "rate", "similarity"} and 0 <= row["rate"] <= 1


def test_wanda_dori_needs_the_mitigation_runs_mask(v2_model):
    with pytest.raises(SystemExit, match="no Wanda mask"):
        probes.wanda_dori(v2_model, [0], steps=1)
