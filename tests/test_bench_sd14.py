"""The SD v1.4 part of `python -m analysis.bench`, run on the CPU with a narrow UNet of the same structure.

CI has no GPU, so this is where the code path of the GPU benchmark is exercised: the handle without a text
encoder, the latent target, the Dori search on it and the rows of the report.
"""

import torch

from analysis.bench.__main__ import SD14_UNET_CONFIG, sd14_rows, sd14_unet_handle

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
