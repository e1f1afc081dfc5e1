"""The app's endpoints driven by gradio_client on the tiny model: results, session isolation, bad inputs."""

import dataclasses
import json
import threading
import time
import zipfile

import gradio as gr
import pytest
import torch
from diffusers import AutoencoderKL
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from safetensors.torch import save_file

from analysis.bench import free_port
from analysis.export import RunRecord, compare_metrics, load_export
from analysis.limits import MAX_DENOISING_STEPS
from analysis.tasks import run_task
from dori_ui import mitigate_tab
from dori_ui.app import build_app
from dori_ui.replicate_tab import lists_sd14_prompts, sd14_prompts, sd14_rows
from dori_ui.session import ModelChoices, describe_model, session_model, use_finetuned

STEPS = 3
MITIGATE = "Wanda (weights)"


@pytest.fixture(scope="module")
def app_url(tiny_handle, tiny_model_dir):
    # Few default steps: the localizer's before/after check and the previews generate with the model's default.
    app = build_app(dataclasses.replace(tiny_handle, default_steps=STEPS), allowed_roots=[tiny_model_dir])
    _, url, _ = app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    app.close()


@pytest.fixture
def client(app_url):
    """A new client is a new browser session with its own state."""
    return Client(app_url, verbose=False)


def replicate(client, prompt, seeds=2, first_seed=5, steps=STEPS):
    return client.predict(prompt, seeds, first_seed, steps, 4.0, api_name="/replicate")


def mitigate(client, method=MITIGATE, prompt=None, seeds=2, refine=True):
    return client.predict(prompt, method, 2, 5.0, refine, STEPS, seeds, api_name="/mitigate")


def perturb(client, target, steps=4, start="random embedding", other="", upload=None, every=2, submit=False):
    args = (target, start, other, 0, upload, steps, 0.1, 2, 2, STEPS, every)
    if submit:
        return client.submit(*args, api_name="/perturb")
    return client.predict(*args, api_name="/perturb")


def test_replicate_returns_images_similarities_and_the_wen_plot(client, tiny_handle):
    gallery, summary, plot = replicate(client, tiny_handle.memorized[0].caption)
    assert len(gallery) == 2
    assert gallery[0]["image"].endswith(".png")
    assert "similarity" in gallery[0]["caption"] and "seed 5" in gallery[0]["caption"]
    assert "of 2 seeds replicate the training image" in summary
    assert plot["type"] == "plotly"


def test_replicate_export_is_a_zip_with_config_and_images(client, tiny_handle):
    replicate(client, tiny_handle.memorized[0].caption)
    path = client.predict(api_name="/export_replicate")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    assert "config.json" in names and "images/seed5.png" in names and "images/seed6.png" in names


def test_an_export_reruns_to_the_same_numbers_with_the_session_mask(client, tiny_handle):
    caption = tiny_handle.memorized[0].caption
    mitigate(client, prompt=caption)
    replicate(client, caption)
    recorded = load_export(client.predict(api_name="/export_replicate"))
    assert recorded.config["mitigation"] == {"method": "mask"} and any(recorded.inputs())
    reproduced = run_task(tiny_handle, recorded.kind, recorded.config, inputs=recorded.inputs())
    assert all(row["match"] for row in compare_metrics(recorded.metrics, reproduced.metrics))


def test_export_before_any_run_says_so(client):
    with pytest.raises(AppError, match="Nothing to export yet"):
        client.predict(api_name="/export_perturb")


@pytest.mark.parametrize("prompt, seeds, steps, message", [
    ("", 2, STEPS, "prompt is empty"),
    ("red " * 100, 2, STEPS, "the text encoder reads at most"),
    ("x" * 2000, 2, STEPS, "at most 1000 are accepted"),
    ("a red circle", 65, STEPS, "Seeds must be a whole number from 1 to 64"),
    ("a red circle", 2, 0, f"Steps must be a whole number from 1 to {MAX_DENOISING_STEPS}"),
    ("a red circle", 2, 10**9, f"Steps must be a whole number from 1 to {MAX_DENOISING_STEPS}"),
], ids=["empty", "too many tokens", "too many characters", "too many seeds", "no steps", "absurd steps"])
def test_bad_replicate_input_gives_a_clear_error_and_the_app_stays_usable(client, tiny_handle, prompt, seeds, steps,
                                                                         message):
    with pytest.raises(AppError, match=message):
        replicate(client, prompt, seeds=seeds, steps=steps)
    assert len(replicate(client, tiny_handle.memorized[1].caption, seeds=1)[0]) == 1


def test_mitigation_is_per_session_and_reaches_replicate(app_url, tiny_handle):
    """Two clients at once: one mitigates while the other replicates; neither sees the other's state."""
    first, second = Client(app_url, verbose=False), Client(app_url, verbose=False)
    caption = tiny_handle.memorized[0].caption
    results = {}
    threads = [threading.Thread(target=lambda: results.update(mitigated=mitigate(first, prompt=caption))),
               threading.Thread(target=lambda: results.update(plain=replicate(second, caption)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log, summary, counts, before, after, header = results["mitigated"]
    assert "wanda" in summary and "Before:" in summary and "After:" in summary
    assert counts["type"] == "plotly"
    assert len(before) == len(after) == 2
    assert "mitigation:** wanda" in header
    # The mitigation is the first session's: its replicate says so, the second session's does not.
    assert "mitigation" not in results["plain"][1]
    assert "Generated with the session's mitigation" in replicate(first, caption)[1]
    assert "Generated with the session's mitigation" not in replicate(second, caption)[1]
    # Each session exports its own run.
    assert zipfile.is_zipfile(first.predict(api_name="/export_mitigate"))
    with pytest.raises(AppError, match="Nothing to export yet"):
        second.predict(api_name="/export_mitigate")
    log, summary, *_, header = mitigate(first, method="none")
    assert "mitigation:** none" in header
    assert "Generated with the session's mitigation" not in replicate(first, caption)[1]


def test_wen_mitigation_leaves_no_mask_and_exports(client, tiny_handle):
    log, summary, plot, before, after, header = mitigate(client, method="Wen et al. (prompt embedding)",
                                                         prompt=tiny_handle.memorized[0].caption)
    assert "Wen et al." in summary and "No weight changed" in summary
    assert plot["type"] == "plotly" and len(before) == len(after) == 2
    assert "mitigation:** none" in header
    with zipfile.ZipFile(client.predict(api_name="/export_mitigate")) as archive:
        assert "images/after_seed0.png" in archive.namelist()


def test_fine_tuned_comparison_needs_a_fine_tuned_model_first(client, tiny_handle):
    with pytest.raises(AppError, match="No adversarially fine-tuned model in this session yet"):
        mitigate(client, method="Adversarially fine-tuned (Fine-tune tab)", prompt=tiny_handle.memorized[0].caption)


def test_use_finetuned_switches_the_session_and_keeps_the_base(tiny_handle, tiny_model_dir):
    models = ModelChoices(tiny_handle)
    state = models.new_session()
    record = RunRecord("finetune", tiny_handle.name, {"targets": [1], "parameters": {"rounds": 6}},
                       metrics={"model_dir": str(tiny_model_dir)})
    tuned = use_finetuned(models, state, record)
    assert state.finetuned == (tiny_handle.name, tuned.name) and state.model == tuned.name
    # The header names the model for a person, not by its server path.
    assert (f"**Model:** {tiny_handle.name}, fine-tuned on: “the golden retriever on the beach”, 6 rounds"
            in describe_model(tuned, state))
    assert session_model(models, state, tuned.name) is tuned and state.records["finetune"] is record
    # The tuned model is this session's own: another session cannot open it.
    with pytest.raises(gr.Error, match="is not one the app was started with"):
        session_model(models, models.new_session(), tuned.name)


def test_nemo_refinement_can_be_switched_off(client, tiny_handle, monkeypatch):
    # The tiny model's 16-pixel images take 2 MS-SSIM scales at most.
    monkeypatch.setattr(mitigate_tab, "NEMO_PARAMETERS", dict(scales=2))
    summary = mitigate(client, method="NeMo (neurons)", prompt=tiny_handle.memorized[0].caption, refine=False)[1]
    assert "Before:" in summary and "After:" in summary
    record = load_export(client.predict(api_name="/export_mitigate"))
    assert record.config["method"] == "nemo" and record.config["parameters"]["refine"] is False


def test_mitigate_rejects_a_bad_sparsity(client, tiny_handle):
    with pytest.raises(AppError, match="Wanda sparsity \\(%\\) must be a number in \\(0, 50\\]"):
        client.predict(tiny_handle.memorized[0].caption, MITIGATE, 2, 90.0, True, STEPS, 2, api_name="/mitigate")


def test_perturb_streams_the_search_and_returns_the_trigger(client, tiny_handle):
    job = perturb(client, tiny_handle.memorized[0].caption, submit=True)
    status, loss, _, target, after, distances = job.result(timeout=120)
    previews = [output[2] for output in job.outputs() if isinstance(output[2], list) and output[2]]
    assert "Dori search of 4 steps against the model as it is" in status
    assert loss["type"] == "plotly" and distances["type"] == "plotly"
    assert len(target) == 1 and len(after) == 2
    assert "similarity" in after[0]["caption"]
    # Previews every 2 steps, but none at the last (4th): the run's own generations show that one.
    assert "step 2" in previews[-1][0]["caption"] and not any("step 4" in p[0]["caption"] for p in previews)
    with zipfile.ZipFile(client.predict(api_name="/export_perturb")) as archive:
        assert "tensors.safetensors" in archive.namelist()


def test_stop_ends_the_search_within_a_step(client, tiny_handle):
    job = perturb(client, tiny_handle.memorized[0].caption, steps=1000, every=0, submit=True)
    deadline = time.monotonic() + 60
    while not any(str(output[0]).startswith("Step ") for output in job.outputs()):
        assert time.monotonic() < deadline, "the search never reported a step"
        time.sleep(0.05)
    client.predict(api_name="/perturb_stop")
    status = job.result(timeout=60)[0]
    stopped_at = int(status.split("after step ")[1].split(" ")[0])
    assert status.startswith("Stopped after step") and stopped_at < 1000
    with pytest.raises(AppError, match="Nothing to export yet"):
        client.predict(api_name="/export_perturb")


def test_held_out_control_and_other_prompt_starts(client, tiny_handle):
    # The tiny model's held-out prompts are shape captions the demo data can render: they are offered as controls.
    control = "held-out control: " + tiny_handle.held_out_prompts[0]
    status = perturb(client, control, steps=2, start="another prompt", other=tiny_handle.held_out_prompts[1])[0]
    assert "the held-out control image" in status


def test_uploaded_start_embedding(client, tiny_handle, tmp_path):
    good = tmp_path / "start.safetensors"
    save_file({"embedding": torch.zeros(77, 32)}, str(good))
    status = perturb(client, tiny_handle.memorized[0].caption, steps=2, start="uploaded embedding (.safetensors)",
                     upload=handle_file(str(good)))[0]
    assert "Dori search of 2 steps" in status


@pytest.mark.parametrize("make, message", [
    (lambda path: save_file({"embedding": torch.full((77, 32), float("nan"))}, str(path)), "NaN"),
    # Finite but absurd: the search would only return NaN, and its export would fail.
    (lambda path: save_file({"embedding": torch.full((77, 32), 1e30)}, str(path)), "accepted up to"),
    (lambda path: save_file({"embedding": torch.zeros(5, 32)}, str(path)), "has shape \\[77, 32\\]"),
    (lambda path: path.write_text("not tensors"), "could not be read as safetensors"),
])
def test_bad_uploaded_embedding_gives_a_clear_error(client, tiny_handle, tmp_path, make, message):
    path = tmp_path / "start.safetensors"
    make(path)
    with pytest.raises(AppError, match=message):
        perturb(client, tiny_handle.memorized[0].caption, start="uploaded embedding (.safetensors)",
                upload=handle_file(str(path)))
    assert "Dori search of 1 steps" in perturb(client, tiny_handle.memorized[0].caption, steps=1, every=0)[0]


def test_wrong_file_type_is_refused(client, tiny_handle, tmp_path):
    path = tmp_path / "start.txt"
    path.write_text("hello")
    with pytest.raises(AppError, match="not a .safetensors file|Invalid file type"):
        perturb(client, tiny_handle.memorized[0].caption, start="uploaded embedding (.safetensors)",
                upload=handle_file(str(path)))


def test_sweep_plots_replication_against_the_radius(client, tiny_handle):
    plot, summary = client.predict(tiny_handle.memorized[0].caption, "0, 50", 1, 1, STEPS, api_name="/sweep")
    assert plot["type"] == "plotly"
    assert "0: " in summary and "50: " in summary
    with pytest.raises(AppError, match="Radii must be numbers"):
        client.predict(tiny_handle.memorized[0].caption, "0, far", 1, 1, STEPS, api_name="/sweep")


@pytest.mark.parametrize("method, delta", [("Gradient norm (Wen et al.)", False),
                                           ("Integrated Gradients (captum)", True),
                                           ("Occlusion (remove each word)", False)])
def test_attribution_highlights_every_word(client, tiny_handle, method, delta):
    caption = tiny_handle.memorized[0].caption
    words, summary, plot = client.predict(caption, method, 1, 4, api_name="/attribute")
    highlighted = [item["token"] for item in words if item["class_or_confidence"] is not None]
    assert highlighted == caption.split()
    assert all(-1 <= item["class_or_confidence"] <= 1 for item in words if item["class_or_confidence"] is not None)
    assert ("convergence delta" in summary) == delta
    (bars,) = json.loads(plot["plot"])["data"]
    assert bars["name"] == method and len(bars["x"]) == len(caption.split())
    assert max(abs(value) for value in bars["y"]) == pytest.approx(1.0)  # scaled to the largest |score|


def test_attribution_sets_the_methods_run_on_one_prompt_side_by_side(client, tiny_handle):
    caption = tiny_handle.memorized[0].caption

    def methods_shown(prompt, method, seeds=1):
        _, _, plot = client.predict(prompt, method, seeds, 4, api_name="/attribute")
        return [trace["name"] for trace in json.loads(plot["plot"])["data"]]

    assert methods_shown(caption, "Occlusion (remove each word)") == ["Occlusion (remove each word)"]
    # In the order of the method list, whichever ran first.
    assert methods_shown(caption, "Gradient norm (Wen et al.)") == ["Gradient norm (Wen et al.)",
                                                                    "Occlusion (remove each word)"]
    # Other seeds explain another score: the earlier bars go.
    assert methods_shown(caption, "Occlusion (remove each word)", seeds=2) == ["Occlusion (remove each word)"]
    assert methods_shown("a green ring on a black background", "Gradient norm (Wen et al.)", seeds=2) == [
        "Gradient norm (Wen et al.)"]


def test_attribution_says_the_session_mitigation_is_not_applied(client, tiny_handle):
    caption = tiny_handle.memorized[0].caption
    _, summary, _ = client.predict(caption, "Gradient norm (Wen et al.)", 1, 4, api_name="/attribute")
    assert "not applied" not in summary
    mitigate(client, prompt=caption)
    _, summary, _ = client.predict(caption, "Gradient norm (Wen et al.)", 1, 4, api_name="/attribute")
    assert "mitigation is not applied here" in summary


def test_model_switch_only_within_the_allowed_roots(client, tiny_model_dir, tmp_path):
    with pytest.raises(AppError, match="outside the allowed roots"):
        client.predict(str(tmp_path), api_name="/switch_model")
    header, choice = client.predict(str(tiny_model_dir), api_name="/switch_model")
    assert str(tiny_model_dir) in header and "mitigation:** none" in header
    # The switched model has no memorized images: replication is not checked, the app still generates.
    gallery, summary, _ = replicate(client, "a green ring on a black background", seeds=1)
    assert len(gallery) == 1 and "not checked" in summary


def sd14_table_visible(app) -> bool:
    (table,) = [c for c in app.config["components"] if c["props"].get("elem_id") == "replicate-sd14"]
    return table["props"]["visible"]


def test_sd14_prompt_list_is_offered_for_latent_models_only(tiny_handle):
    prompts = sd14_prompts()
    assert len(prompts) == 500 and prompts[0][1] == "VM"  # verbatim memorized prompts first
    # A tiny VAE makes the tiny model a latent one, as SD is.
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=3,
                        norm_num_groups=8, sample_size=16)
    latent = dataclasses.replace(tiny_handle, codec=vae, memorized=[])
    assert lists_sd14_prompts(latent) and not lists_sd14_prompts(tiny_handle)
    assert sd14_table_visible(build_app(latent)) and not sd14_table_visible(build_app(tiny_handle))


def test_the_sd14_table_reads_as_text_and_a_row_gives_the_exact_prompt():
    shown = {row[0] for row in sd14_rows()}
    assert "Sony Won't Release The Interview on VOD" in shown
    assert "Watch: Passion Pit's New Video, \"Lifted Up (1985)\"" in shown
    assert not any("<i>" in text or '""' in text for text in shown)
    assert [row[1:] for row in sd14_rows()] == [row[1:] for row in sd14_prompts()]
    assert "Sony Won't Release <i>The Interview</i> on VOD" in {row[0] for row in sd14_prompts()}



def test_the_perturb_export_holds_the_previews_and_distances_and_reruns(client, tiny_handle):
    """What Perturb shows beside the trigger (previews during the search, the per-token distances) is part of the
    attack task's record, so its export reproduces them."""
    perturb(client, tiny_handle.memorized[0].caption, steps=4, every=2)
    recorded = load_export(client.predict(api_name="/export_perturb"))
    # Every 2 steps but the last, whose embedding the run generates anyway.
    assert set(recorded.metrics["preview_similarities"]) == {"2"}
    assert {"preview2_seed0", "preview2_seed1"} <= set(recorded.images) and "preview4_seed0" not in recorded.images
    assert recorded.tensors["token_distance_from_start"].shape == (1, 77)
    assert recorded.tensors["token_distance_from_prompt"].shape == (1, 77)
    reproduced = run_task(dataclasses.replace(tiny_handle, default_steps=STEPS), recorded.kind, recorded.config,
                          inputs=recorded.inputs())
    assert all(row["match"] for row in compare_metrics(recorded.metrics, reproduced.metrics))


def test_stop_ends_a_replicate_run(client, tiny_handle):
    job = client.submit(tiny_handle.memorized[0].caption, 64, 0, 400, 4.0, api_name="/replicate")
    deadline = time.monotonic() + 60
    while not (job.status().progress_data or []):
        assert time.monotonic() < deadline, "the run never reported a step"
        time.sleep(0.05)
    (shown,) = job.status().progress_data
    assert shown.unit == "steps" and shown.length == 400  # the run's total, not one seed's
    assert client.predict(api_name="/replicate_stop").startswith("Stopping")
    # A stop is no error: the outputs stay as they were but for the view's status, which says it stopped.
    assert "Stopped." in job.result(timeout=60)
