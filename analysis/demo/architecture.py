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

from collections import Counter

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from analysis.demo.data import RESOLUTION

TEXT_WIDTH = 128
MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"  # ids 0 and 1; EOS pads, as in SD v1.x
WORD_END = "</w>"  # CLIP's BPE marks the last piece of every word

UNET_CONFIG = dict(
    sample_size=RESOLUTION,
    in_channels=3,
    out_channels=3,
    # One layer per block and no attention at full resolution keep the model
    # interactive on a 2-core CPU (MODEL_CARD.md gives the measured costs).
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
    """Train a CLIP-format byte-level BPE tokenizer on `captions`, offline and deterministically.

    Ids: the two special tokens, the 256 byte symbols, the same with CLIP's
    `</w>` word-end suffix, then one token per merge in the order learned. Each
    merge joins the most frequent adjacent pair of symbols; ties go to the pair
    that sorts first, so the same captions give the same tokenizer in every
    process (the `tokenizers` trainer breaks ties in hash order).
    """
    from tokenizers.pre_tokenizers import ByteLevel

    # CLIP's own normalizer and word splitter, so the learned merges apply at load time as they were learned.
    backend = CLIPTokenizer().backend_tokenizer
    word_counts = Counter(word for caption in captions for word, _ in
                          backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(caption)))
    words = {(*word[:-1], word[-1] + WORD_END): count for word, count in word_counts.items()}
    alphabet = sorted(ByteLevel.alphabet())
    vocab = [BOS, EOS, *alphabet, *(symbol + WORD_END for symbol in alphabet)]
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += count
        if not pair_counts:  # every word is one token
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        vocab.append("".join(best))
        words = {merge_pair(symbols, best): count for symbols, count in words.items()}
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=merges, model_max_length=MAX_LENGTH)


def merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """`symbols` with every non-overlapping occurrence of `pair`, left to right, joined into one symbol."""
    merged, i = [], 0
    while i < len(symbols):
        if symbols[i:i + 2] == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


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
