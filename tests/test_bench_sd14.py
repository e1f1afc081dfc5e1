"""The SD v1.4 part of `python -m analysis.bench`, run on the CPU with a narrow UNet of the same structure.

CI has no GPU, so this is where the code path of the GPU benchmark is exercised: the handle without a text
encoder, the latent target, the Dori search on it and the rows of the report.
"""

import torch

from analysis.bench import SD14_UNET_CONFIG
from analysis.bench.__main__ import sd14_rows, sd14_unet_handle

# SD v1.4's blocks, attention layout and cross-attention on 77 tokens, with few channels and a small latent.
NARROW = dict(SD14_UNET_CONFIG, block_out_channels=(8, 8, 16, 16), norm_num_groups=4, attention_head_dim=2,
              cross_attention_dim=16, sample_size=8)


def test_the_sd14_rows_time_a_dori_search_on_a_latent_handle():
    handle = sd14_unet_handle("cpu", torch.float32, unet_config=NARROW)
    assert handle.latent_shape == (4, 8, 8) and handle.text_encoder is None
    rows, details = sd14_rows(handle, repeats=1, search_steps=2)
    labels = [label for label, _, _ in rows]
    assert labels == ["CPU, SD v1.4 UNet float32: Dori step / bare forward + backward, batch 8",
                      "CPU, SD v1.4 UNet float32: Dori search, 2 steps, batch 8"]
    ratio, search = float(rows[0][1]), float(rows[1][1].removesuffix(" s"))
    assert ratio > 0 and search > 0
    assert details[0].startswith("CPU runs, in seconds: bare pass")


def test_the_published_config_builds_sd14_sized_blocks():
    # The configuration only (meta device: no memory): SD v1.4's UNet has 859.5 M parameters.
    with torch.device("meta"):
        unet = sd14_unet_handle("meta", torch.float32).unet
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964


def test_the_rehearsal_builds_saves_loads_and_runs_every_analysis(tmp_path):
    """`analysis.bench.sd14_rehearsal` on a narrow pipeline of SD v1.4's structure: the same code path as the
    full-size run that writes docs/results/sd14_cpu_rehearsal.md."""
    import dataclasses

    from analysis.bench.sd14_rehearsal import SD14_TEXT_ENCODER_CONFIG, SD14_VAE_CONFIG, analyses, build_folder
    from analysis.model import load_model

    text = dict(SD14_TEXT_ENCODER_CONFIG, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, projection_dim=16)
    vae = dict(SD14_VAE_CONFIG, block_out_channels=(8, 8, 8, 8), norm_num_groups=4, sample_size=64)
    build_folder(tmp_path / "model", unet_config=NARROW, text_encoder_config=text, vae_config=vae)
    assert sorted(path.name for path in (tmp_path / "model" / "unet").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]
    handle = dataclasses.replace(load_model(tmp_path / "model"), default_steps=2)
    assert not handle.pixel_space and handle.latent_shape == (4, 8, 8)
    runs = analyses(handle, size=64)
    assert len(runs) == 5
    for run in runs.values():
        run()
