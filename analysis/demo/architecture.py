"""The demo model's components: SD's architecture family at a size a CPU can run.

* tokenizer: CLIP's byte-level BPE with the `</w>` word suffix, trained offline
  on the demo captions (no download), read back by `CLIPTokenizer`;
* text encoder: a 4-layer `CLIPTextModel`, width 128, kept frozen at its seeded
  random initialisation (SD keeps its text encoder frozen too; a jointly
  trained one collapsed all shape captions to one embedding in a feasibility
  run);
* UNet: `UNet2DConditionModel` with cross-attention on the text encoder's
  hidden states, in 32x32 pixel space (pass-through image codec);
* scheduler: DDIM with SD's scaled-linear betas.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from analysis.demo.data import RESOLUTION
from analysis.model import CODEC_SUBFOLDER, PassThroughCodec

TEXT_WIDTH = 128
MAX_LENGTH = 77

UNET_CONFIG = dict(
    sample_size=RESOLUTION,
    in_channels=3,
    out_channels=3,
    # One layer per block and no attention at full resolution keep a batch-8
    # forward near 150 ms on 2 CPU cores (measured; 2 layers per block doubled it).
    layers_per_block=1,
    block_out_channels=(32, 64, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_WIDTH,
    attention_head_dim=8,
    norm_num_groups=16,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def build_tokenizer(captions: list[str], vocab_size: int = 1024) -> CLIPTokenizer:
    """Train a CLIP-format BPE tokenizer on `captions`, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>", continuing_subword_prefix=""))
    # The same splitting CLIPTokenizer applies, so the learned merges match at load time.
    probe = CLIPTokenizer()
    bpe.normalizer = probe.backend_tokenizer.normalizer
    bpe.pre_tokenizer = probe.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        continuing_subword_prefix="",
        show_progress=False,
    )
    # Each printable character as a word of its own, so none is unknown at word end.
    corpus = list(captions) + [" ".join(string.printable.strip())]
    bpe.train_from_iterator(corpus, trainer=trainer)
    with tempfile.TemporaryDirectory() as tmp:
        bpe.model.save(tmp)
        vocab = json.loads(Path(tmp, "vocab.json").read_text())
        merges = [tuple(line.split()) for line in Path(tmp, "merges.txt").read_text().splitlines()
                  if line and not line.startswith("#")]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


def build_text_encoder(vocab_size: int, seed: int = 0) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=TEXT_WIDTH,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config)


def build_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG)


def build_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULER_CONFIG)


def save_pipeline_folder(folder: Path, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel,
                         unet: UNet2DConditionModel, scheduler: DDIMScheduler, vae: AutoencoderKL | None = None) -> None:
    """Write the standard diffusers layout that `load_model` reads: `vae/` when given, else the pixel-space `codec/`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    if vae is not None:
        vae.save_pretrained(folder / "vae", safe_serialization=True)
        return
    PassThroughCodec(latent_channels=unet.config.in_channels, sample_size=unet.config.sample_size).save_pretrained(
        folder / CODEC_SUBFOLDER)
