import json
import os
import subprocess
import sys

from analysis.demo.architecture import BOS, EOS, WORD_END, build_tokenizer, merge_pair
from analysis.demo.data import DemoDataset

CAPTIONS = ["a red square on a blue background", "a red circle", "the über-red lighthouse's lights, don't!"]
BUILD = ("import json, sys; from analysis.demo.architecture import build_tokenizer; "
         "t = build_tokenizer(json.loads(sys.argv[1])); "
         "print(json.dumps([sorted(t.get_vocab().items(), key=lambda kv: kv[1]), t.tokenize(sys.argv[2])]))")


def test_the_same_captions_give_the_same_tokenizer_in_every_process():
    """The `tokenizers` trainer broke ties in hash order: two processes gave some tokens other ids."""
    captions = DemoDataset().all_captions()
    builds = [subprocess.run([sys.executable, "-c", BUILD, json.dumps(captions), captions[0]], check=True,
                             capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout
              for seed in (1, 2)]
    assert builds[0] == builds[1]


def test_ids_and_merges():
    tokenizer = build_tokenizer(CAPTIONS)
    vocab = tokenizer.get_vocab()
    assert vocab[BOS] == 0 and vocab[EOS] == 1
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert vocab["a" + WORD_END] == 2 + 256 + vocab["a"] - 2  # each byte symbol, then the same with the suffix
    # Merging runs until no pair is left, so every caption word is one token; an unseen word is spelled in pieces.
    assert tokenizer.tokenize("a red square") == ["a</w>", "red</w>", "square</w>"]
    assert "".join(tokenizer.tokenize("zebra")).replace(WORD_END, "") == "zebra"


def test_a_small_vocabulary_stops_merging():
    assert len(build_tokenizer(CAPTIONS, vocab_size=2 + 512 + 3)) == 2 + 512 + 3


def test_merge_pair_joins_non_overlapping_occurrences_left_to_right():
    assert merge_pair(("a", "a", "a", "b</w>"), ("a", "a")) == ("aa", "a", "b</w>")
