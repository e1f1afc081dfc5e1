"""README's "Your own Stable Diffusion model" commands, run as written on the tiny latent SD folder: the folder, the
imagefolder set and the SSCD stand-in stand for $SD, $SET and $SSCD, the CPU for CUDA, and each command gets only
options that make it small (steps, seeds, sizes). `dori memorized fetch` never reaches the network here: its options
are parsed, and tests/test_fetch.py runs it against a local server."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from tiny_sd import write_memorized_set

import app
from analysis.cli import build_parser, main
from analysis.experiments import paper_table
from analysis.model import REPO_ROOT

NEMO = ["steps=3", "step_index=1", "scales=1", "window=7", "theta_start=1", "refine=false",
        "calibration_seeds=[0,1]"]
WANDA = ["steps=2", "record_steps=1"]
SMALL = {
    "replicate": ["--steps", "2", "--seeds", "0-1"],
    "localize": ["--seeds", "0,1", "--evaluation-seeds", "0", *[a for p in NEMO for a in ("--param", p)]],
    "attack": ["--search-steps", "2", "--batch-size", "2", "--evaluation-seeds", "0", "--steps", "2"],
    "sweep": ["--directions", "1", "--seeds", "0", "--steps", "2"],
    "attribute": ["--param", "seeds=[0]"],
    "triggers": ["--count", "3", "--starts-per-batch", "3", "--search-steps", "2", "--evaluation-seeds", "0"],
    "discrepancy": ["--count", "2", "--steps", "2"],
    "agreement": ["--count", "2", "--seeds", "0,1", *[a for p in NEMO for a in ("--nemo-param", p)],
                  *[a for p in WANDA for a in ("--wanda-param", p)]],
    "finetune": [a for p in ["triggers_per_image=1", "steps_per_round=1", 'dori={"steps": 1, "batch_size": 1}',
                             "surrogate_seeds=1", "eval_seeds=1", "normal_batch=2", "adversarial_batch=2"]
                 for a in ("--param", p)],
}


PAPER_TABLE_SMALL = ["--images", "0", "--seeds", "1", "--search-steps", "1",
                     "--nemo", json.dumps(dict(steps=3, step_index=1, scales=1, window=7, theta_start=1, refine=False,
                                               calibration_seeds=[0, 1])),
                     "--wanda", json.dumps(dict(steps=2, record_steps=1)),
                     "--finetune", json.dumps(dict(rounds=1, triggers_per_image=1, steps_per_round=1,
                                                   dori=dict(steps=1, batch_size=1), surrogate_seeds=1, eval_seeds=1,
                                                   normal_batch=2, adversarial_batch=2, normal_images=2))]


def readme_commands() -> list[str]:
    """The lines of the section's bash block."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Your own Stable Diffusion model", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    return block.strip().splitlines()


def on_cpu(argv: list[str]) -> list[str]:
    """On the CPU, in this process: a local executor stands in for Ray (tests/test_experiment_paper_table.py runs a
    local Ray cluster)."""
    return [{"cuda": "cpu", "float16": "float32", "ray": "local"}.get(arg, arg) for arg in argv]


def test_the_readme_commands_run_on_the_tiny_model(tiny_sd_folder, memorized_set_dir, sscd_file, tmp_path,
                                                   monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    variables = {"SD": str(tiny_sd_folder), "SET": str(memorized_set_dir), "SSCD": str(sscd_file)}
    ran = []
    for line in readme_commands():
        if re.fullmatch(r"(\w+=\S+ ?)+", line.strip()):  # SD=... SET=... SSCD=...
            variables.update(pair.split("=", 1) for pair in line.split() if pair.split("=", 1)[0] not in variables)
            continue
        expanded = re.sub(r"\$(\w+)", lambda match: variables[match.group(1)], line)
        if expanded.startswith("M="):
            variables["M"] = shlex.split(expanded)[0].removeprefix("M=")
            continue
        argv = on_cpu(shlex.split(expanded))
        if argv[:2] == ["python", "app.py"]:
            options = app.parse_args(argv[2:])
            assert (options.memorized, options.sscd) == (variables["SET"], variables["SSCD"])
            continue
        if argv[:3] == ["python", "-m", "analysis.experiments.paper_table"]:
            write_memorized_set(tmp_path / "data" / "controls", captions=["a quiet harbour"], seed=7)
            paper_table.main([*argv[3:], *PAPER_TABLE_SMALL])
            assert "| adversarial fine-tuning + Dori | 1 |" in capsys.readouterr().out
            ran.append("paper_table")
            continue
        assert argv[0] == "dori", line
        if argv[1:3] == ["memorized", "fetch"]:
            assert build_parser().parse_args(argv[1:]).verbatim_only
            continue
        code = main([*argv[1:], *SMALL.get(argv[1], []), "--quiet", "--json"])
        out, err = capsys.readouterr()
        assert code == 0, f"{line}\n{err}"
        ran.append(argv[1])
        printed = json.loads(out)
        if argv[1] not in ("triggers", "rerun"):
            assert printed["config"]["replication"]["metric"] == "SSCD"
        if argv[1] == "rerun":
            assert printed["reproduced"] is True
    assert ran == ["replicate", "localize", "attack", "rerun", "sweep", "attribute", "triggers", "map", "discrepancy",
                   "agreement", "finetune", "paper_table"]
    assert (Path(tmp_path) / "runs" / "finetuned" / "model" / "unet").is_dir()
