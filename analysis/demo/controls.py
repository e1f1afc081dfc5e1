"""Write the bundled model's control images: renderings of its held-out captions, which it never trained on.

    python -m analysis.demo.controls [--out assets/demo_model/controls]

An imagefolder (PNG + metadata.csv) that `load_model` reads as the model's
`controls`: the Perturb view's held-out controls (a Dori search toward one
should fail) and the paper table's control row. One seeded rendering per
caption at the model's resolution, as the held-out control always was.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
from PIL import Image

from analysis.demo.data import RESOLUTION, all_shape_specs, render_shapes
from analysis.images import to_uint8
from analysis.model import CONTROLS_SUBFOLDER, DEMO_MODEL_DIR, load_model


def write_controls(folder: Path, captions: list[str], resolution: int = RESOLUTION) -> Path:
    """One rendering of each caption (seed 0 per image) as `controlI.png`, with `metadata.csv`."""
    specs = {spec.caption: spec for spec in all_shape_specs()}
    unknown = [caption for caption in captions if caption not in specs]
    if unknown:
        raise ValueError(f"the demo data cannot render {unknown}")
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, caption in enumerate(captions):
        image = render_shapes([specs[caption]], torch.Generator().manual_seed(0), resolution=resolution)
        name = f"control{index}.png"
        Image.fromarray(to_uint8(image)[0].numpy()).save(folder / name)
        rows.append(dict(file_name=name, text=caption))
    with open(folder / "metadata.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["file_name", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO_MODEL_DIR / CONTROLS_SUBFOLDER)
    args = parser.parse_args(argv)
    print(f"wrote {write_controls(args.out, load_model(None).held_out_prompts)}")


if __name__ == "__main__":
    main()
