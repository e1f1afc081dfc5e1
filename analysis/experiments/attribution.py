"""Which words of a memorized caption drive its memorization score?

    python -m analysis.experiments.attribution [--model FOLDER] [--only I ...]

For every memorized caption of the bundled model, token attribution of Wen
et al.'s score by gradient norm, by Integrated Gradients and by word occlusion.
Occlusion removes each word and measures how much the score drops: it is the
ground truth of how much the model's score depends on each word, which the two
gradient methods approximate. A word is *identifying* when it occurs in no
other caption of the training data (e.g. "astronaut"), *generic* otherwise
(e.g. "a", "on", "white"). Reports, per method, how often identifying words
outscore generic ones (the AUC over all pairs of one caption's words), the
Spearman correlation of the scores with word position and, for the gradient
methods, with occlusion's scores.

Beside the score, what the score stands for: replication of the training photo
(`REMOVAL_SEEDS` generations at the model's defaults) when one word is removed,
when only the identifying words are kept and when only the generic ones are,
with m of each of these prompts. Writes docs/results/attribution.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from analysis.attribution import GradientNorm, IntegratedGradients, Occlusion, memorization_objective
from analysis.demo.data import split_shape_specs
from analysis.metrics import replication, roc_auc
from analysis.memorized import MemorizedImage
from analysis.model import ModelHandle, load_model
from analysis.sampling import encode_prompts, sample

RESULTS = Path("docs/results")
GROUND_TRUTH = "occlusion"
CHANCE_MARGIN = 0.1  # an occlusion AUC within this of 0.5 means the model does not single out identifying words
REMOVAL_SEEDS = tuple(range(8))
SCORE_SEEDS = (0, 1, 2, 3)  # m's seeds, the attribution methods' default
REPLICATES = 0.5  # a prompt replicates the photo when at least this share of its generations do


def identifying_words(caption: str, other_captions: list[str]) -> set[str]:
    elsewhere = {word for other in other_captions for word in other.split()}
    return {word for word in caption.split() if word not in elsewhere}


def identifying_auc(words: list[str], scores: list[float], identifying: set[str]) -> float | None:
    """How often an identifying word outscores a generic one; None when the caption lacks either kind."""
    pos = [score for word, score in zip(words, scores) if word in identifying]
    neg = [score for word, score in zip(words, scores) if word not in identifying]
    return roc_auc(pos, neg) if pos and neg else None


def spearman(a: list[float], b: list[float]) -> float:
    rank = lambda values: torch.tensor(values).argsort().argsort().float()  # noqa: E731
    return torch.corrcoef(torch.stack([rank(a), rank(b)]))[0, 1].item()


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def replication_without_words(handle: ModelHandle, item: MemorizedImage, words: list[str],
                               identifying: set[str]) -> dict:
    """Replication of `item` and m for its caption, the caption without each word, and each kind of word alone."""
    prompts = dict(caption=" ".join(words),
                   identifying_only=" ".join(w for w in words if w in identifying),
                   generic_only=" ".join(w for w in words if w not in identifying))
    without = [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]
    texts = [*prompts.values(), *without]
    with torch.no_grad():
        images = sample(handle, texts, REMOVAL_SEEDS, steps=handle.default_steps,
                        guidance=handle.default_guidance).images.view(len(texts), len(REMOVAL_SEEDS), *item.image.shape)
        scores = memorization_objective(handle, SCORE_SEEDS)(encode_prompts(handle, texts)).tolist()
    rates = [replication(generated, item.image).rate for generated in images]
    row = {name: dict(prompt=text, replication=rate, score=score)
           for (name, text), rate, score in zip(prompts.items(), rates, scores)}
    row["without_word"] = [dict(word=word, replication=rate, score=score)
                           for word, rate, score in zip(words, rates[len(prompts):], scores[len(prompts):])]
    return row


def removal_summary(removals: list[dict]) -> dict:
    """How many captions need some single word, or their identifying / generic words, to replicate; does m follow?"""
    prompts = [p for row in removals for p in (row["caption"], row["identifying_only"], row["generic_only"],
                                                  *row["without_word"])]
    replicating = [p["score"] for p in prompts if p["replication"] >= REPLICATES]
    not_replicating = [p["score"] for p in prompts if p["replication"] < REPLICATES]
    # What occlusion of m ranks words by, where replication does not move at all.
    unchanged = [(row["caption"]["score"] - w["score"]) / row["caption"]["score"] for row in removals
                 for w in row["without_word"] if w["replication"] == row["caption"]["replication"]]
    return dict(
        captions=len(removals),
        captions_replicating=sum(row["caption"]["replication"] >= REPLICATES for row in removals),
        captions_needing_one_word=sum(any(w["replication"] < REPLICATES for w in row["without_word"])
                                      for row in removals),
        identifying_only_replicating=sum(row["identifying_only"]["replication"] >= REPLICATES for row in removals),
        generic_only_replicating=sum(row["generic_only"]["replication"] >= REPLICATES for row in removals),
        # Does m tell the prompts that replicate from those that do not?
        score_auc_replicating=roc_auc(replicating, not_replicating) if replicating and not_replicating else None,
        removals_replication_unchanged=len(unchanged),
        removals=sum(len(row["without_word"]) for row in removals),
        largest_score_drop_replication_unchanged=max(unchanged, default=None))


def removal_row(row: dict) -> str:
    def cell(entry: dict) -> str:
        return f"{entry['replication']:.2f} (m {entry['score']:.2f})"

    needed = min(row["without_word"], key=lambda entry: entry["replication"])
    lowest = (f"{cell(needed)} without *{needed['word']}*" if needed["replication"] < row["caption"]["replication"]
              else f"{needed['replication']:.2f} without any one word")
    return (f"| {row['caption']['prompt']} | {cell(row['caption'])} | {lowest} | "
            f"{cell(row['identifying_only'])}: {row['identifying_only']['prompt']} | "
            f"{cell(row['generic_only'])}: {row['generic_only']['prompt']} |")


def why_removal(removal: dict) -> str:
    """What replication under word removal says about the ground truth the attribution methods are judged on."""
    n = removal["captions"]
    text = (
        f"**What the score stands for.** {removal['captions_replicating']} of {n} captions replicate their photo. "
        f"Removing one word stops replication (below {REPLICATES:.0%} of {len(REMOVAL_SEEDS)} seeds) for "
        f"{removal['captions_needing_one_word']} of {n} captions; {removal['removals_replication_unchanged']} of "
        f"{removal['removals']} single-word removals leave replication exactly as it was. The identifying words "
        f"alone replicate the photo for {removal['identifying_only_replicating']} of {n} captions, the generic words "
        f"alone for {removal['generic_only_replicating']}.")
    if removal["identifying_only_replicating"] > removal["generic_only_replicating"]:
        text += (" The bundled model's memorization is carried by the identifying words as a group and redundantly: "
                 f"for {n - removal['captions_needing_one_word']} of {n} captions no single word is needed, so a "
                 "ranking of single words has little replication to follow.")
    if removal["largest_score_drop_replication_unchanged"] is not None:
        text += (
            " Wen et al.'s m still moves when one word goes, by up to "
            f"{removal['largest_score_drop_replication_unchanged']:.0%} of its value where replication stays the "
            "same: those moves are what occlusion above ranks the words by, and the gradient methods approximate")
        auc = removal["score_auc_replicating"]
        text += ("." if auc is None else
                 f". Across all these prompts m does separate those that replicate from those that do not (AUC "
                 f"{auc:.2f}): it measures the text's whole effect on the first noise prediction, which prompts of "
                 "one or two generic words lack.")
    return (text + " The target, identifying words ranked above generic ones one by one, needs a model whose "
            "replication depends on single identifying words; whether a model with a trained text encoder (the "
            "bundled one is random and frozen, assets/demo_model/MODEL_CARD.md) is such a model is open here, "
            "since that needs a retraining on a GPU.")


def why(summary: dict) -> str:
    """What the measured numbers say: the ground truth's AUC, then how far the gradient methods follow it."""
    truth = summary[GROUND_TRUTH]["mean_auc"]
    if abs(truth - 0.5) <= CHANCE_MARGIN:
        reading = (f"**Why.** Occlusion, the ground truth, ranks identifying words above generic ones with AUC "
                   f"{truth:.2f}, close to chance (0.5): the bundled model's score does not single out the words that "
                   "identify a memorized photo. Its text encoder is random, frozen and causal "
                   "(assets/demo_model/MODEL_CARD.md): position i of the embedding carries words 1..i mixed by "
                   "random weights, so no position stands for one word, and removing any word changes every later "
                   "position. No attribution method can put identifying words first where the model does not: an "
                   "AUC well above 0.5 is a property of the model, not of the attribution method.")
    else:
        direction = "more" if truth > 0.5 else "less"
        reading = (f"**Why.** Occlusion, the ground truth, ranks identifying words above generic ones with AUC "
                   f"{truth:.2f}: the bundled model's score depends {direction} on the words that identify a "
                   "memorized photo than on generic ones.")
    gradients = {method: numbers for method, numbers in summary.items() if method != GROUND_TRUTH}

    def each_gradient(key: str) -> str:
        return ", ".join(f"{numbers[key]:.2f} ({method})" for method, numbers in gradients.items())

    agreement = (
        "The gradient methods' scores correlate with word position at Spearman "
        f"{each_gradient('mean_spearman_position_vs_score')} (occlusion: "
        f"{summary[GROUND_TRUTH]['mean_spearman_position_vs_score']:.2f}) and with occlusion at "
        f"{each_gradient('mean_spearman_vs_occlusion')}. The gradient norm measures how m answers a small change of "
        "one position's text embedding y (the encoder's output); occlusion removes a word, which changes every later "
        "position of y, since the encoder is causal. Integrated Gradients integrates over the token embeddings, "
        "the encoder's input, and so also credits a word with what it changes at later positions. What an "
        "attribution method can be judged on is that agreement with occlusion.")
    return f"{reading}\n\n{agreement}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model folder with a memorized.json (default: the bundled model)")
    parser.add_argument("--only", type=int, nargs="+", default=None,
                        help="attribute only these memorized captions (indices in memorized.json)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.time()
    handle = load_model(args.model)
    captions = [m.caption for m in handle.memorized]
    shape_captions = [spec.caption for specs in split_shape_specs() for spec in specs]
    methods = [GradientNorm(), IntegratedGradients(), Occlusion()]
    rows, removals = [], []
    for index, item in enumerate(handle.memorized):
        if args.only is not None and index not in args.only:
            continue
        caption = item.caption
        unique = identifying_words(caption, shape_captions + [c for c in captions if c != caption])
        removals.append(replication_without_words(handle, item, caption.split(), unique))
        for method in methods:
            result = method.attribute(handle, caption)
            auc = identifying_auc(result.words, result.word_scores, unique)
            rows.append(dict(caption=caption, method=result.method, words=result.words,
                             word_scores=result.word_scores, identifying=sorted(unique), auc=auc,
                             spearman_position=spearman(list(range(len(result.words))), result.word_scores),
                             convergence_delta=result.convergence_delta, score=result.score))
            ranked = ", ".join(f"{w} {s:.3f}" for w, s in result.ranked_words())
            print(f"{result.method:21s} AUC {auc if auc is None else round(auc, 2)}  {ranked}", flush=True)
    truth = {row["caption"]: row["word_scores"] for row in rows if row["method"] == GROUND_TRUTH}
    for row in rows:
        if row["method"] != GROUND_TRUTH:
            row["spearman_occlusion"] = spearman(row["word_scores"], truth[row["caption"]])

    summary = {}
    for method in dict.fromkeys(row["method"] for row in rows):  # in the order the methods ran
        own = [row for row in rows if row["method"] == method]
        aucs = [row["auc"] for row in own if row["auc"] is not None]
        # Does the score follow the word's position rather than its meaning?
        summary[method] = dict(mean_auc=mean(aucs), captions=len(aucs),
                               mean_spearman_position_vs_score=mean([row["spearman_position"] for row in own]))
        if method != GROUND_TRUTH:
            summary[method]["mean_spearman_vs_occlusion"] = mean([row["spearman_occlusion"] for row in own])
    removal = removal_summary(removals)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attribution.json").write_text(json.dumps(dict(summary=summary, rows=rows, removal=removal,
                                                              removals=removals), indent=1))
    lines = [
        "# Token attribution on the bundled demo model",
        "",
        f"Written by `python -m analysis.experiments.attribution` ({time.time() - started:.0f} s). "
        "Score explained: Wen et al.'s first-step magnitude m, mean of 4 seeds. Occlusion scores a word by how much "
        "m drops when the word is removed from the caption: it is the ground truth of how much the model's score "
        "depends on each word, which the gradient methods approximate. Identifying words occur in no other "
        "training caption; AUC = how often an identifying word outscores a generic word of the same caption "
        "(0.5 = chance). Spearman correlations are per caption, then averaged.",
        "",
        "| method | mean AUC identifying > generic | Spearman(word position, score) | "
        "Spearman(score, occlusion) | captions |",
        "|---|---|---|---|---|",
        *[f"| {m} | {s['mean_auc']:.2f} | {s['mean_spearman_position_vs_score']:.2f} | "
          f"{'ground truth' if m == GROUND_TRUTH else format(s['mean_spearman_vs_occlusion'], '.2f')} | "
          f"{s['captions']} |" for m, s in summary.items()],
        "",
        why(summary),
        "",
        f"Replication of the training photo ({len(REMOVAL_SEEDS)} seeds) and m, for the caption, the caption "
        "without its most needed word (the removal that lowers replication most), only its identifying words and "
        "only its generic words:",
        "",
        "| caption | caption | without one word (lowest) | identifying words only | generic words only |",
        "|---|---|---|---|---|",
        *[removal_row(row) for row in removals],
        "",
        why_removal(removal),
        "",
        "| caption | method | AUC | words by score |",
        "|---|---|---|---|",
        *[f"| {r['caption']} | {r['method']} | {'' if r['auc'] is None else format(r['auc'], '.2f')} | "
          + ", ".join(f"{w} {s:.3f}" for w, s in sorted(zip(r["words"], r["word_scores"]), key=lambda p: -p[1]))
          + " |" for r in rows],
        "",
    ]
    (args.out / "attribution.md").write_text("\n".join(lines))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
