"""Campaigns: one analysis over a prompt list, one result file per item, resumable, local or on Ray.

    items = load_items("bundled")                      # or a CSV/JSON file, "sd14-memorized", ...
    summary = run_campaign(items, "replicate", {"seeds": [0, 1, 2, 3]}, "runs/campaign")
    print(summary["table_markdown"])

`run_one(item, method, config)` runs `analysis.tasks.run_task` for one item
and returns a JSON-ready result. `run_campaign` writes each result to
`OUT/items/ID.json` (temporary file + `os.replace`, so a file is whole or
absent), skips items whose file exists, and aggregates every item into the
paper-style table: per group (all, and each VM/TM type when the list has
types) the mean ± std over items of the item's mean similarity, and the
memorization rate MR, the share of items whose replicating share of seeds is
at least `min_share` (as `analysis.metrics.memorization_rate`).

`config` holds the analysis settings plus `model` (folder or hub id, None for
the bundled model), `device` and `dtype`. Executors: "local" (in this process)
and "ray" (`ray.init()` locally, or `address` of a running cluster; one task
per item, one GPU each when CUDA is available). The driver writes every file,
so Ray workers need no shared disk.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from analysis.memorized import (MEMORIZED_FILE, PROMPT_COLUMNS, REFERENCE_PROMPTS_FILE, SD14_MEMORIZED_FILE,
                                memorized_captions, read_table, row_prompt)
from analysis.model import DEMO_MODEL_DIR, ModelHandle, open_model
from analysis.progress import Callback, report
from analysis.tasks import run_task

SHIPPED_LISTS = {"sd14-memorized": SD14_MEMORIZED_FILE, "sd14-unmemorized": REFERENCE_PROMPTS_FILE}
MODEL_SETTINGS = ("model", "device", "dtype", "memorized", "reference_prompts", "sscd", "sscd_threshold", "normal")
# Where each method's per-item similarity and replicating share are found in its record's metrics.
SCORES = {
    "replicate": ("mean_similarity", "rate"),
    "attack": ("similarity", "mean_rate"),
    "localize": ("after_mean_similarity", "after_rate"),
}
CAMPAIGN_FILE = "campaign.json"
ITEMS_FOLDER = "items"
MIN_SHARE = 0.5

_loaded: dict[tuple, ModelHandle] = {}  # one model per (model, device, dtype) and process, reused across items


# ---------------------------------------------------------------------------------------------------------------
# Prompt lists


def _item(index: int, row: dict) -> dict:
    prompt = row_prompt(row)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"item {index} has no prompt (a column {' or '.join(PROMPT_COLUMNS)}): {row}")
    item = dict(id=str(row.get("id", row.get("Index", index))), prompt=prompt)
    if row.get("image") not in (None, ""):
        item["image"] = int(row["image"])
    kind = row.get("type")
    if kind not in (None, ""):
        item["type"] = str(kind)
    return item


def load_items(source: str | Path, model: str | None = None, memorized: str | Path | None = None) -> list[dict]:
    """Items `{"id", "prompt", ["image"], ["type"]}` from a prompt list.

    `source`: "bundled" (the memorized captions of the `memorized` set, else of
    `model`'s sidecar, each with its training image index), a shipped list name
    (`SHIPPED_LISTS`), or a CSV (',' or ';' separated, a `prompt`/`caption`
    column, optional `id`, `type`, `image`) or JSON file (a list of prompts or
    of such objects).
    """
    if source == "bundled":
        if memorized is not None:
            return [dict(id=f"{i:04d}", prompt=caption, image=i)
                    for i, caption in enumerate(memorized_captions(memorized))]
        sidecar = (DEMO_MODEL_DIR if model is None else Path(model)) / MEMORIZED_FILE
        if not sidecar.is_file():
            raise ValueError(f"no list of memorized captions at {sidecar}: give a prompt list file or --memorized")
        captions = json.loads(sidecar.read_text())["captions"]
        return [dict(id=f"{i:04d}", prompt=caption, image=i) for i, caption in enumerate(captions)]
    path = SHIPPED_LISTS.get(str(source), Path(source))
    if not path.is_file():
        raise FileNotFoundError(f"no prompt list at {path}; give a CSV/JSON file, 'bundled' or one of {sorted(SHIPPED_LISTS)}")
    rows = read_table(path)
    items = [_item(index, row) for index, row in enumerate(rows)]
    ids = [item["id"] for item in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: item ids are not unique")
    return items


# ---------------------------------------------------------------------------------------------------------------
# One item


def model_for(config: dict) -> ModelHandle:
    """The model a configuration names (`MODEL_SETTINGS`), loaded once per process and settings."""
    key = tuple(config.get(name) for name in MODEL_SETTINGS)
    if key not in _loaded:
        settings = {name: config[name] for name in MODEL_SETTINGS if config.get(name) is not None}
        _loaded[key] = open_model(**settings)
    return _loaded[key]


def run_one(item: dict, method: str, config: dict) -> dict:
    """Run `method` (a `run_task` kind) on one item; returns `{"item", "method", "config", "metrics"}`.

    `config`: the task's settings plus `model`, `device`, `dtype`. The item's
    prompt (and training image index, if it has one) are the task's target.
    """
    handle = model_for(config)
    settings = {key: value for key, value in config.items() if key not in MODEL_SETTINGS}
    target = dict(prompt=item["prompt"], **({"image": item["image"]} if "image" in item else {}))
    record = run_task(handle, method, {**settings, **target})
    return dict(item=item, method=method, config=record.config, metrics=record.metrics)


# ---------------------------------------------------------------------------------------------------------------
# The campaign


def _write_json(path: Path, value) -> None:
    """Whole or absent: written to a temporary file beside `path`, then renamed over it."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=1))
    os.replace(temporary, path)


def _item_file(out_dir: Path, item: dict) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in item["id"])
    return out_dir / ITEMS_FOLDER / f"{safe}.json"


def _call(run_item: Callable[[dict], dict], item: dict) -> dict:
    return run_item(item)


def _ray_results(pending: list[dict], run_item: Callable[[dict], dict], address: str | None, workers: int | None):
    """Yield (item, result) as Ray tasks finish."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False)
    # Ray starts CPU workers with one torch thread; another thread count sums in another order, and the table would
    # differ from the local executor's in the last digits. So the workers get the driver's count.
    threads = {"env_vars": {"OMP_NUM_THREADS": str(torch.get_num_threads())}}
    remote = ray.remote(num_gpus=1 if torch.cuda.is_available() else 0, runtime_env=threads)(_call)
    futures = {remote.remote(run_item, item): item for item in pending}
    while futures:
        done, _ = ray.wait(list(futures), num_returns=1)
        yield futures.pop(done[0]), ray.get(done[0])


def run_items(items: Sequence[dict], run_item: Callable[[dict], dict], header: dict, out_dir: str | Path,
              executor: str = "local", address: str | None = None, workers: int | None = None,
              callback: Callback | None = None) -> tuple[list[dict], int]:
    """`run_item(item)` for every item without a result file in `OUT/items/`, locally or one Ray task (one GPU
    when CUDA is available) each; returns every item's result, in the items' order, and how many were computed.

    `header` (JSON) describes the settings: a folder that holds results of other settings is refused with
    ValueError. A result file is whole or absent, so a run killed at any point resumes where it stopped.
    `run_item` must be picklable for Ray (a module-level function, or a `functools.partial` of one).
    `callback` receives a `TaskProgress` after each item (`analysis.progress`).
    """
    if executor not in ("local", "ray"):
        raise ValueError(f"unknown executor {executor!r}; choose 'local' or 'ray'")
    if not items:
        raise ValueError("the list of items is empty")
    out_dir = Path(out_dir)
    (out_dir / ITEMS_FOLDER).mkdir(parents=True, exist_ok=True)
    header = json.loads(json.dumps(header))
    campaign_file = out_dir / CAMPAIGN_FILE
    if campaign_file.is_file() and json.loads(campaign_file.read_text()) != header:
        raise ValueError(f"{out_dir} holds results of other settings: {campaign_file.read_text()}; "
                         "use another folder or the same settings")
    _write_json(campaign_file, header)

    pending = [item for item in items if not _item_file(out_dir, item).is_file()]
    done = len(items) - len(pending)
    report(callback, "campaign", done, len(items), f"{done} done before")
    results = (((item, run_item(item)) for item in pending) if executor == "local"
               else _ray_results(pending, run_item, address, workers))
    for item, result in results:
        _write_json(_item_file(out_dir, item), result)
        done += 1
        report(callback, "campaign", done, len(items), item["id"])
    return [json.loads(_item_file(out_dir, item).read_text()) for item in items], len(pending)


def run_campaign(items: Sequence[dict], method: str, config: dict, out_dir: str | Path, executor: str = "local",
                 address: str | None = None, workers: int | None = None, min_share: float = MIN_SHARE,
                 callback: Callback | None = None) -> dict:
    """Run `method` on every item not done yet in `out_dir` (`run_items`), then aggregate all of them.

    `callback` receives a `TaskProgress` after each item. `workers`: CPUs of a local Ray (None: all). Returns the summary that is
    also written to `OUT/summary.json` (and the table to `OUT/table.md`).
    Raises ValueError when `out_dir` holds a campaign with other settings.
    """
    if method not in SCORES:
        raise ValueError(f"unknown campaign method {method!r}; choose one of {sorted(SCORES)}")
    if not items:
        raise ValueError("the prompt list is empty")
    finished, computed = run_items(items, functools.partial(run_one, method=method, config=config),
                                   dict(method=method, config=config), out_dir, executor, address, workers, callback)
    table = aggregate(finished, method, min_share)
    summary = dict(method=method, config=config, items=len(items), computed=computed, table=table,
                   table_markdown=table_markdown(table, method, min_share))
    _write_json(Path(out_dir) / "summary.json", summary)
    (Path(out_dir) / "table.md").write_text(summary["table_markdown"] + "\n")
    return summary


def load_campaign(out_dir: str | Path, min_share: float = MIN_SHARE) -> dict:
    """A campaign folder as it stands (also one still running or killed): `method`, `config`, `results`
    (one per finished item, in file-name order) and their aggregated `table`. For the app to browse."""
    out_dir = Path(out_dir)
    campaign_file = out_dir / CAMPAIGN_FILE
    if not campaign_file.is_file():
        raise ValueError(f"{out_dir} is not a campaign folder: it has no {CAMPAIGN_FILE}")
    header = json.loads(campaign_file.read_text())
    results = [json.loads(path.read_text()) for path in sorted((out_dir / ITEMS_FOLDER).glob("*.json"))]
    table = aggregate(results, header["method"], min_share) if results else []
    return dict(**header, results=results, table=table)


def aggregate(results: Sequence[dict], method: str, min_share: float = MIN_SHARE) -> list[dict]:
    """Rows `{"group", "items", "scored", "similarity_mean", "similarity_std", "mr"}`: all items, then each type."""
    similarity_key, rate_key = SCORES[method]
    groups: dict[str, list[dict]] = {"all": list(results)}
    for result in results:
        if "type" in result["item"]:
            groups.setdefault(result["item"]["type"], []).append(result)
    rows = []
    for group, members in groups.items():
        scored = [(m["metrics"][similarity_key], m["metrics"][rate_key]) for m in members
                  if similarity_key in m["metrics"]]
        rows.append(dict(group=group, items=len(members), **summarize(scored, min_share)))
    return rows


def summarize(scores: Sequence[tuple[float, float]], min_share: float = MIN_SHARE) -> dict:
    """Over items' (mean similarity, replicating share of seeds): `scored`, `similarity_mean`, `similarity_std` and
    the memorization rate `mr`, the share of items replicating on at least `min_share` of their seeds."""
    similarities = [similarity for similarity, _ in scores]
    return dict(scored=len(scores),
                similarity_mean=statistics.fmean(similarities) if scores else None,
                # Population std over items, as the tables in the papers report the spread of the items themselves.
                similarity_std=statistics.pstdev(similarities) if scores else None,
                mr=sum(share >= min_share for _, share in scores) / len(scores) if scores else None)


def table_markdown(rows: Sequence[dict], method: str, min_share: float = MIN_SHARE) -> str:
    def number(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    lines = [f"| {method}: items | similarity (mean ± std) | MR (share of seeds replicating ≥ {min_share:g}) |",
             "|---|---|---|"]
    lines += [f"| {row['group']} ({row['scored']} of {row['items']} scored) | "
              f"{number(row['similarity_mean'])} ± {number(row['similarity_std'])} | {number(row['mr'])} |"
              for row in rows]
    return "\n".join(lines)
