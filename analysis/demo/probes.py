"""Quick probes of a demo-model candidate that the experiment scripts do not make (docs/results/demo_v2_feasibility.md).

    python -m analysis.demo.probes --model runs/demo_v2_warm --out runs/demo_v2_warm_results [--wanda 3 9]

* controls: a 50-step Dori search from each chosen v2 control's caption toward that never-trained image;
* v1 photos (`--v1-photos`): the same toward the bundled v1 model's photos with their v1 captions, to tell whether
  a UNet warm-started from v1 and trained without them has forgotten them (reached like a control: forgotten);
* Wanda + Dori: for memorized images `--wanda`, the Wanda mask the mitigation experiment saved for them on these
  weights, then a 50-step Dori search under it;
* generic captions: the last 20 COCO captions and a few short prompts, replication of the nearest memorized image.

4 seeds each, the model's default sampling. Writes OUT/probes.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from analysis.demo.data import CONTROLS_V2, coco_split, load_photos, load_set
from analysis.dori import DoriSearch, Start, evaluate
from analysis.localize.saved import mask_file
from analysis.masks import Mask
from analysis.metrics import REPLICATION_THRESHOLD, similarity_matrix
from analysis.model import ModelHandle, load_model
from analysis.sampling import sample

SEEDS = [0, 1, 2, 3]
SHORT_PROMPTS = ["a photo of the", "a photo of a man", "a close up of a cat", "a black background"]


def dori_toward(handle: ModelHandle, captions: list[str], images: torch.Tensor, indices: list[int],
                steps: int) -> dict:
    """A Dori search from each chosen caption's embedding toward its image: replication before and after."""
    rows = {}
    for i in indices:
        result = DoriSearch(steps=steps).fit(handle, images[i], [Start.prompt(captions[i])], prompt=captions[i])
        before = evaluate(handle, result.starts, images[i], SEEDS)
        after = evaluate(handle, result.embeddings, images[i], SEEDS)
        rows[captions[i]] = dict(rate_before=before.rates.item(), similarity_before=before.similarities.mean().item(),
                                 rate=after.rates.item(), similarity=after.similarities.mean().item())
        print(captions[i], rows[captions[i]], flush=True)
    return rows


def wanda_dori(handle: ModelHandle, indices: list[int], steps: int) -> dict:
    rows = {}
    for index in indices:
        target, path = handle.memorized[index], mask_file(handle, "wanda", index)
        if not path.is_file():
            raise SystemExit(f"no Wanda mask for image {index} on these weights: run analysis.experiments.mitigation "
                             f"--model ... --only {index} first")
        with Mask.load(path).applied(handle):
            result = DoriSearch(steps=steps, seed=index).fit(handle, target.image, [Start.prompt(target.caption)],
                                                             prompt=target.caption)
            after = evaluate(handle, result.embeddings, target.image, SEEDS)
        rows[target.caption] = dict(rate=after.rates.item(), similarity=after.similarities.mean().item())
        print(target.caption, rows[target.caption], flush=True)
    return rows


def generic_captions(handle: ModelHandle) -> dict:
    photos = torch.stack([m.image for m in handle.memorized])
    rows = []
    for prompt in coco_split()[1][-20:] + SHORT_PROMPTS:
        images = sample(handle, [prompt], SEEDS, steps=handle.default_steps, guidance=handle.default_guidance).images
        similarities = similarity_matrix(images, photos)
        best = similarities.max(1).values
        rows.append(dict(prompt=prompt, replicated=(best > REPLICATION_THRESHOLD).float().mean().item(),
                         max_similarity=best.max().item(),
                         nearest=handle.memorized[int(similarities.max(0).values.argmax())].caption))
        print(rows[-1], flush=True)
    coco = rows[:20]
    return dict(coco_mean_replicated=sum(r["replicated"] for r in coco) / len(coco),
                coco_max_similarity=max(r["max_similarity"] for r in coco), rows=rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--controls", type=int, nargs="*", default=[0, 1, 6], help="indices in data.CONTROLS_V2")
    parser.add_argument("--v1-photos", type=int, nargs="*", default=[], help="indices of the v1 recipe's photos")
    parser.add_argument("--wanda", type=int, nargs="*", default=[], help="memorized images for Wanda + Dori")
    parser.add_argument("--steps", type=int, default=50, help="Dori steps")
    args = parser.parse_args(argv)
    handle = load_model(args.model)
    result = dict(model=args.model, seeds=SEEDS, dori_steps=args.steps,
                  controls=dori_toward(handle, *load_set(CONTROLS_V2), args.controls, args.steps),
                  v1_photos=dori_toward(handle, *load_photos(recipe="v1"), args.v1_photos, args.steps),
                  wanda_dori=wanda_dori(handle, args.wanda, args.steps), generic=generic_captions(handle))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probes.json").write_text(json.dumps(result, indent=1))
    print(f"coco captions replicating: {result['generic']['coco_mean_replicated']:.3f}", flush=True)


if __name__ == "__main__":
    main()
