"""Distilling all-MiniLM-L6-v2 into the demo's CLIP text encoder: targets, alignment and a short run."""

import json

import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from analysis.demo import text_encoder
from analysis.demo.architecture import build_tokenizer
from analysis.demo.data import recipe_captions


def test_student_ids_are_what_the_tokenizer_gives_the_pipeline():
    captions = ["a photo of chelsea the tabby cat", "immunohistochemistry of stained tissue under a microscope"]
    tokenizer = build_tokenizer(recipe_captions("v2"), vocab_size=600)
    ids, word_of, eos_at = text_encoder.student_ids(captions, tokenizer)
    expected = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, expected)
    for caption, owners, end in zip(captions, word_of, eos_at):
        assert owners[0] == -1 and owners[end] == -1 and int(owners.max()) == len(caption.split()) - 1


def test_loss_is_zero_on_its_targets_and_counts_padding_as_summary():
    word_of = torch.tensor([[-1, 0, 0, 1, -1, -1]])
    hidden = torch.zeros(1, 6, 4)
    hidden[0, 1:3] = 1.0  # word 0's pieces: their mean is its state
    hidden[0, 3] = 2.0
    hidden[0, 4:] = 3.0  # EOS and padding: the sentence state
    words = [torch.tensor([[1.0] * 4, [2.0] * 4])]
    sentence = torch.full((1, 4), 3.0)
    assert text_encoder.distillation_loss(hidden, word_of, torch.tensor([4]), words, sentence) == 0
    hidden[0, 5] = 4.0  # one padding state off by 1 of 2 summary positions
    assert text_encoder.distillation_loss(hidden, word_of, torch.tensor([4]), words, sentence) == pytest.approx(0.5)


def test_a_short_distillation_writes_a_standard_text_encoder_and_its_measures(tmp_path):
    record = text_encoder.main(["--out", str(tmp_path), "--steps", "3", "--batch-size", "8", "--coco", "60",
                                "--held-out", "10", "--vocab-size", "600", "--data", "v2"])
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    model = CLIPTextModel.from_pretrained(str(tmp_path / "text_encoder"))
    assert model.config.hidden_size == 128 and len(tokenizer) == 600
    saved = json.loads((tmp_path / "distillation.json").read_text())
    assert saved["held_out_captions"] == 10 and len(recipe_captions("v2")) < saved["train_captions"] <= len(recipe_captions("v2")) + 50
    assert -1 <= record["held_out_cosine_mean"] <= 1 and 0 <= record["synonym_wins"] <= 1
