import json

import pytest
import torch

from analysis.attribution import GradientNorm, IntegratedGradients, Occlusion, memorization_objective, prompt_tokens
from analysis.experiments.attribution import (GROUND_TRUTH, RESULTS, identifying_auc, removal_summary,
                                              replication_without_words)
from analysis.export import compare_metrics, save_export
from analysis.rerun import rerun
from analysis.wen_score import wen_score
from analysis.model import REPO_ROOT, load_model
from analysis.sampling import encode_prompts
from analysis.tasks import run_task

PROMPT = "a photo of the red lighthouse"


def test_pieces_map_back_to_words(tiny_handle):
    pieces, words, word_of_piece = prompt_tokens(tiny_handle, PROMPT)
    assert words == PROMPT.split()
    assert len(word_of_piece) == len(pieces)
    assert "".join(p.removesuffix("</w>") for p in pieces) == PROMPT.replace(" ", "")


def test_words_joined_by_spaces_retokenize_to_the_same_pieces(tiny_handle):
    """What Occlusion relies on: leaving a word out of the joined words leaves out exactly its pieces."""
    pieces, words, word_of_piece = prompt_tokens(tiny_handle, "The über-red lighthouse's 2 lights, don't!")
    assert "über" in words and "don" in words and "'t" in words  # bytes decoded; CLIP splits "'t" off
    for left_out in range(len(words)):
        occluded = " ".join(words[:left_out] + words[left_out + 1:])
        kept = [piece for piece, word in zip(pieces, word_of_piece) if word != left_out]
        assert prompt_tokens(tiny_handle, occluded)[0] == kept, occluded


def test_objective_is_wen_score(tiny_handle):
    seeds = [0, 1]
    objective = memorization_objective(tiny_handle, seeds)
    expected = wen_score(tiny_handle, [PROMPT], seeds=seeds, steps=tiny_handle.default_steps)[0, 0]
    torch.testing.assert_close(objective(encode_prompts(tiny_handle, [PROMPT]))[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", [GradientNorm(seeds=[0, 1]), IntegratedGradients(seeds=[0, 1], n_steps=8),
                                    Occlusion(seeds=[0, 1])])
def test_scores_one_per_token_and_word(tiny_handle, method):
    result = method.attribute(tiny_handle, PROMPT)
    assert result.token_scores.shape == (len(result.tokens),)
    assert result.words == PROMPT.split()
    assert sum(result.word_scores) == pytest.approx(result.token_scores.sum().item(), rel=1e-5)  # one piece a word
    assert torch.isfinite(result.token_scores).all()


def test_gradient_norm_is_non_negative(tiny_handle):
    assert (GradientNorm(seeds=[0]).attribute(tiny_handle, PROMPT).token_scores >= 0).all()


def test_integrated_gradients_completeness(tiny_handle):
    """Attributions over all positions add up to m(y) − m(y0) = m(y); captum's delta measures the gap."""
    result = IntegratedGradients(seeds=[0, 1], n_steps=16).attribute(tiny_handle, PROMPT)
    assert result.convergence_delta < 1e-2 * result.score


def test_integrated_gradients_credit_only_the_words_where_padding_is_eos(tiny_handle):
    """The baseline differs from the prompt only at the word positions, so the words' scores alone add up to m(y)."""
    assert tiny_handle.tokenizer.pad_token_id == tiny_handle.tokenizer.eos_token_id
    result = IntegratedGradients(seeds=[0, 1], n_steps=16).attribute(tiny_handle, PROMPT)
    assert sum(result.word_scores) == pytest.approx(result.score, abs=result.convergence_delta + 1e-3 * result.score)


def test_occlusion_is_the_drop_of_the_score_without_each_word(tiny_handle):
    seeds = [0, 1]
    objective = memorization_objective(tiny_handle, seeds)
    score = lambda text: objective(encode_prompts(tiny_handle, [text]))[0].item()  # noqa: E731
    words = PROMPT.split()
    without = [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]
    result = Occlusion(seeds=seeds).attribute(tiny_handle, PROMPT)
    assert result.score == pytest.approx(score(PROMPT), rel=1e-5)
    assert result.word_scores == pytest.approx([score(PROMPT) - score(text) for text in without], rel=1e-4, abs=1e-6)


def test_occlusion_gives_each_piece_its_word_score(tiny_handle):
    result = Occlusion(seeds=[0]).attribute(tiny_handle, "don't stop")  # "don" and "'t" are two pieces each
    _, words, word_of_piece = prompt_tokens(tiny_handle, "don't stop")
    assert len(word_of_piece) > len(words)
    assert result.token_scores.tolist() == [result.word_scores[word] for word in word_of_piece]


@pytest.mark.parametrize("method", [GradientNorm, IntegratedGradients, Occlusion])
def test_empty_prompt_is_rejected(tiny_handle, method):
    with pytest.raises(ValueError, match="no tokens"):
        method().attribute(tiny_handle, "")


def test_occlusion_runs_as_a_task_and_reruns_from_its_export(tiny_model_folder, tmp_path):
    record = run_task(load_model(tiny_model_folder), "attribute", {"image": 0, "method": "occlusion",
                                                                   "parameters": {"seeds": [0]}})
    assert record.config["parameters"] == {"seeds": [0]}
    assert [row["word"] for row in record.table] == record.config["prompt"].split()
    recorded, reproduced = rerun(save_export(record, tmp_path / "occlusion.zip"), model=record.model)
    rows = compare_metrics(recorded.metrics, reproduced.metrics)
    assert rows and all(row["match"] for row in rows), [row for row in rows if not row["match"]]


def test_bundled_model_occlusion_is_what_the_results_file_reports():
    """The results file's ground truth for the first caption, measured again, and its AUC recomputed.

    Occlusion's AUC identifying > generic is what the model does, whatever it is: near chance on the
    bundled model (docs/results/attribution.md), so this test asserts the measurement, not a target.
    """
    handle = load_model()
    caption = handle.memorized[0].caption
    rows = json.loads((REPO_ROOT / RESULTS / "attribution.json").read_text())["rows"]
    (reported,) = [row for row in rows if row["caption"] == caption and row["method"] == GROUND_TRUTH]
    result = Occlusion().attribute(handle, caption)
    assert result.words == reported["words"]
    assert result.word_scores == pytest.approx(reported["word_scores"], rel=1e-3, abs=1e-4)
    assert reported["auc"] == identifying_auc(result.words, reported["word_scores"], set(reported["identifying"]))


def test_bundled_model_replication_without_words_is_what_the_results_file_reports():
    """The first caption's replication with each word removed and with one kind of word only, measured again."""
    handle = load_model()
    results = json.loads((REPO_ROOT / RESULTS / "attribution.json").read_text())
    reported = results["removals"][0]
    (occlusion,) = [row for row in results["rows"]
                    if row["caption"] == handle.memorized[0].caption and row["method"] == GROUND_TRUTH]
    measured = replication_without_words(handle, handle.memorized[0], occlusion["words"], set(occlusion["identifying"]))
    assert [w["word"] for w in measured["without_word"]] == occlusion["words"]
    for name in ("caption", "identifying_only", "generic_only"):
        assert measured[name]["prompt"] == reported[name]["prompt"]
        assert measured[name]["replication"] == reported[name]["replication"]
        assert measured[name]["score"] == pytest.approx(reported[name]["score"], rel=1e-3)
    assert [w["replication"] for w in measured["without_word"]] == [w["replication"] for w in reported["without_word"]]
    assert results["removal"] == removal_summary(results["removals"])


def test_removal_summary_counts_what_single_words_and_kinds_of_words_do():
    def entry(replication, score, word=None):
        return dict(replication=replication, score=score, **({} if word is None else dict(word=word)))

    removals = [
        dict(caption=entry(1.0, 4.0), identifying_only=entry(1.0, 3.0), generic_only=entry(0.0, 1.0),
             without_word=[entry(1.0, 3.0, "tabby"), entry(1.0, 4.0, "the")]),
        dict(caption=entry(1.0, 2.0), identifying_only=entry(0.0, 1.5), generic_only=entry(0.75, 1.0),
             without_word=[entry(0.25, 1.0, "hubble"), entry(1.0, 2.0, "with")]),
    ]
    summary = removal_summary(removals)
    assert summary["captions_replicating"] == 2
    assert summary["captions_needing_one_word"] == 1  # only "hubble" is needed
    assert (summary["identifying_only_replicating"], summary["generic_only_replicating"]) == (1, 1)
    assert (summary["removals_replication_unchanged"], summary["removals"]) == (3, 4)
    assert summary["largest_score_drop_replication_unchanged"] == pytest.approx(0.25)  # "tabby": 4 -> 3
    # m of the 7 prompts that replicate: 4, 3, 2, 1, 3, 4, 2; of the 3 that do not: 1, 1.5, 1.
    # 6 of the 7 beat all 3 (18 pairs); m = 1 ties two (2 × 0.5) and loses to 1.5: 19 of 21 pairs.
    assert summary["score_auc_replicating"] == pytest.approx(19 / 21)
