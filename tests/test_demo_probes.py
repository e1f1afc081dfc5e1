"""The demo-model probes run on a v2 model folder."""

import pytest

from analysis.demo import probes, train
from analysis.model import load_model


@pytest.fixture(scope="module")
def v2_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2")
    train.main(["--out", str(root / "model"), "--work-dir", str(root / "run"), "--steps", "1", "--batch-size", "2",
                "--warmup", "1", "--device", "cpu", "--data", "v2"])
    return load_model(root / "model")


def test_dori_toward_a_control_reports_before_and_after(v2_model):
    rows = probes.dori_controls(v2_model, [6], steps=1)
    (row,) = rows.values()
    assert set(row) == {"rate_before", "similarity_before", "rate", "similarity"} and 0 <= row["rate"] <= 1


def test_wanda_dori_needs_the_mitigation_runs_mask(v2_model):
    with pytest.raises(SystemExit, match="no Wanda mask"):
        probes.wanda_dori(v2_model, [0], steps=1)
