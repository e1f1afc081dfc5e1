"""Every app endpoint, through gradio_client, on the tiny latent SD folder with an imagefolder memorized set,
reference prompts and an SSCD stand-in: what `python app.py --model ... --memorized ... --sscd ...` serves."""

from __future__ import annotations

import json

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from tiny_sd import REFERENCE_PROMPTS, SET_CAPTIONS, write_memorized_set

from analysis.export import compare_metrics, load_export
from analysis.rerun import rerun
from app import main as app_main
from analysis.model import open_model
from dori_ui import finetune_tab, mitigate_tab, paths_tab, trigger_map_tab
from dori_ui.app import build_app
from dori_ui.trigger_map_tab import BUILD
from served import served

STEPS = 2
SSCD_LABEL = "similarity (SSCD)"
# NeMo compares δ of 8x8 latents: one MS-SSIM scale fits.
NEMO = dict(scales=1, window=7, steps=3, step_index=1, calibration_seeds=[0, 1])


@pytest.fixture(scope="module")
def handle(tiny_sd_folder, memorized_set_dir, reference_prompts_file, sscd_file, tmp_path_factory):
    # A normal set, as a researcher passes with --normal: otherwise fine-tuning first generates 64 normal pairs at
    # 50 steps (tests/test_normal.py covers that road).
    normal = write_memorized_set(tmp_path_factory.mktemp("normal"), captions=["a field", "a street"])
    return open_model(str(tiny_sd_folder), memorized=str(memorized_set_dir),
                      reference_prompts=str(reference_prompts_file), sscd=str(sscd_file), normal=str(normal))


@pytest.fixture(scope="module")
def allowed_root(tmp_path_factory):
    """An allowed root holding another memorized set (one image) and a broken one."""
    root = tmp_path_factory.mktemp("allowed")
    write_memorized_set(root / "one_image", captions=SET_CAPTIONS[1:])
    broken = write_memorized_set(root / "broken")
    (broken / "image1.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def app(handle, allowed_root, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trigger_map_tab, "BUILT_SETS", tmp_path_factory.mktemp("trigger_sets"))
        patch.setattr(finetune_tab, "RUNS", tmp_path_factory.mktemp("finetune"))
        patch.setattr(mitigate_tab, "NEMO_PARAMETERS", NEMO)
        patch.setattr(paths_tab, "NEMO_PARAMETERS", NEMO)
        patch.setattr(paths_tab, "WANDA_PARAMETERS", dict(steps=STEPS, record_steps=1))
        app = build_app(handle, allowed_roots=[allowed_root])
        with served(app) as url:
            yield app, Client(url, verbose=False)


@pytest.fixture(scope="module")
def client(app):
    return app[1]


def component(app, elem_id: str) -> dict:
    (found,) = [c for c in app.config["components"] if c["props"].get("elem_id") == elem_id]
    return found["props"]


def reruns_alike(path: str, handle, out_dir=None) -> None:
    """An export the app wrote runs again from the command line's `rerun` with the same numbers: every number of
    the record, which is every number the view shows (previews, controls and selected generations included)."""
    settings = handle.data_settings()
    recorded, reproduced = rerun(path, device=str(handle.device), model=handle.name, out_dir=out_dir,
                                 memorized=settings["memorized_set"], reference_prompts=settings["reference_prompts"],
                                 sscd=settings["replication"].get("sscd"), normal=settings["normal_set"])
    # A fine-tuning rerun writes its model inside `out_dir`, not where the app did.
    rows = [row for row in compare_metrics(recorded.metrics, reproduced.metrics) if row["metric"] != "model_dir"]
    assert rows and all(row["match"] for row in rows), [row for row in rows if not row["match"]]


def test_the_views_follow_the_model(app, handle):
    app = app[0]
    gallery = component(app, "replicate-training")
    assert gallery["visible"] and len(gallery["value"]) == len(SET_CAPTIONS)
    assert component(app, "replicate-sd14")["visible"]  # SD v1.4's prompt list, for a latent model
    assert component(app, "replicate-steps")["value"] == 50 and component(app, "replicate-guidance")["value"] == 7.5
    assert component(app, "replicate-prompt")["value"] == SET_CAPTIONS[0]
    assert "similarity (SSCD) > 0.7" in component(app, "model-header")["value"]


def test_replicate_names_sscd_and_exports_it(client, handle):
    gallery, summary, plot = client.predict(SET_CAPTIONS[0], 2, 0, STEPS, 7.5, api_name="/replicate")
    assert len(gallery) == 2 and all(SSCD_LABEL in item["caption"] for item in gallery)
    assert f"replicated = {SSCD_LABEL} > 0.7" in summary and plot["type"] == "plotly"
    path = client.predict(api_name="/export_replicate")
    assert load_export(path).config["replication"]["metric"] == "SSCD"
    reruns_alike(path, handle)


@pytest.mark.parametrize("method", ["NeMo (neurons)", "Wanda (weights)"])
def test_mitigate_with_nemo_and_wanda(client, handle, method):
    log, summary, counts, before, after, header = client.predict(SET_CAPTIONS[1], method, 2, 5.0, False, STEPS, 2,
                                                                 api_name="/mitigate")
    assert "Before:" in summary and f"mean {SSCD_LABEL}" in summary
    assert len(before) == len(after) == 2 and all(SSCD_LABEL in item["caption"] for item in after)
    path = client.predict(api_name="/export_mitigate")
    record = load_export(path)
    assert record.config["replication"]["metric"] == "SSCD"
    assert record.config["reference_prompts"].endswith("prompts.csv")
    reruns_alike(path, handle)
    client.predict(None, "none", 2, 5.0, False, STEPS, 2, api_name="/mitigate")  # back to no mitigation


def test_perturb_and_sweep(client, handle):
    status, loss, _, target, after, distances = client.predict(
        SET_CAPTIONS[0], "random embedding", "", 0, None, 2, 0.1, 2, 2, STEPS, 0, api_name="/perturb")
    assert "Dori search of 2 steps" in status and f"mean {SSCD_LABEL}" in status
    assert len(target) == 1 and len(after) == 2 and all(SSCD_LABEL in item["caption"] for item in after)
    reruns_alike(client.predict(api_name="/export_perturb"), handle)
    plot, summary = client.predict(SET_CAPTIONS[0], "0, 5", 1, 1, STEPS, api_name="/sweep")
    assert SSCD_LABEL in json.loads(plot["plot"])["layout"]["yaxis"]["title"]["text"]
    reruns_alike(client.predict(api_name="/export_sweep"), handle)


def test_trigger_map_and_paths(client, handle):
    status, plot, table = client.predict(SET_CAPTIONS[0], BUILD, "pca", "replication", 3, 2, 1,
                                         api_name="/trigger_map_load")
    assert status.startswith("3 triggers of") and len(table["data"]) == 3
    labels = {name: trace for trace in json.loads(plot["plot"])["data"] for name in [trace["name"]]}
    assert len(labels["held-out prompts"]["x"]) == len(REFERENCE_PROMPTS)
    gallery, summary, _ = client.predict(1, 2, "set and start", api_name="/trigger_map_show")
    assert len(gallery) == 2 and all(SSCD_LABEL in item["caption"] for item in gallery)
    reruns_alike(client.predict(api_name="/export_trigger_map_selected"), handle)
    reruns_alike(client.predict(api_name="/export_trigger_map"), handle)
    summary, plot = client.predict("value", 2, api_name="/paths_discrepancy")
    assert summary.startswith("2 triggers of")
    reruns_alike(client.predict(api_name="/export_paths"), handle)
    status, plot, counts = client.predict(2, 2, api_name="/paths_masks")
    assert status.startswith("NeMo and Wanda fitted on 2 triggers")
    reruns_alike(client.predict(api_name="/export_paths_masks"), handle)


def test_attribution(client, handle):
    words, summary, plot = client.predict(SET_CAPTIONS[0], "Occlusion (remove each word)", 1, 4,
                                          api_name="/attribute")
    assert [item["token"] for item in words if item["class_or_confidence"] is not None] == SET_CAPTIONS[0].split()
    reruns_alike(client.predict(api_name="/export_attribution"), handle)


def test_finetune_one_round_and_switch(client, handle, tmp_path):
    status, table, side_effects, held_out = client.predict(
        [SET_CAPTIONS[0]], 1, 1, 1, 1, 1, 1, 1e-4, "adam", "the whole UNet (the paper's)",
        "toward the noise (L_DM, the paper's)", 0, api_name="/finetune")
    assert status.startswith("Fine-tuned 1 image(s) in 1 round(s)")
    assert f"caption {SSCD_LABEL}" in table["headers"]
    path = client.predict(api_name="/export_finetune")
    assert load_export(path).config["replication"]["metric"] == "SSCD"
    reruns_alike(path, handle, out_dir=tmp_path)
    header, message = client.predict(api_name="/finetune_use")
    assert "similarity (SSCD) > 0.7" in header and "fine-tuned model" in message


def test_a_session_switches_memorized_sets_inside_the_allowed_roots(app, allowed_root, tmp_path):
    session = Client(app[1].src, verbose=False)  # a session of its own
    assert sorted(component(app[0], "memorized-choice")["choices"]) == sorted(
        [("", ""), *[(str(allowed_root / name),) * 2 for name in ("broken", "one_image")]])
    header = session.predict(str(allowed_root / "one_image"), api_name="/switch_memorized")
    assert f"**memorized:** 1 images from {allowed_root / 'one_image'}" in header
    gallery, summary, _ = session.predict(SET_CAPTIONS[1], 1, 0, STEPS, 7.5, api_name="/replicate")
    assert "replicate the training image" in summary
    assert load_export(session.predict(api_name="/export_replicate")).config["memorized_set"] == str(
        allowed_root / "one_image")
    with pytest.raises(AppError, match=r"metadata.csv row 2: image1.png could not be decoded"):
        session.predict(str(allowed_root / "broken"), api_name="/switch_memorized")
    with pytest.raises(AppError, match="outside the allowed roots"):
        session.predict(str(tmp_path), api_name="/switch_memorized")
    header = session.predict("", api_name="/switch_memorized")  # back to the model's own
    assert f"**memorized:** {len(SET_CAPTIONS)} images" in header


@pytest.mark.parametrize("option, make, message", [
    ("--sscd", lambda path: path.write_bytes(b"junk"), "is not a TorchScript file"),
    ("--sscd", lambda path: None, "no SSCD TorchScript file at"),
    ("--memorized", lambda path: path.mkdir(), "no metadata.csv or metadata.jsonl"),
], ids=["SSCD not TorchScript", "SSCD missing", "set without metadata"])
def test_python_app_py_stops_at_start_on_bad_input(tiny_sd_folder, tmp_path, option, make, message):
    given = tmp_path / "given"
    make(given)
    with pytest.raises(SystemExit, match=message):
        app_main(["--model", str(tiny_sd_folder), option, str(given)])
