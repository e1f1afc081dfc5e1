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

import csv
import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from analysis.model import DEMO_MODEL_DIR, MEMORIZED_FILE, REPO_ROOT, ModelHandle, load_model
from analysis.progress import Callback, report
from analysis.tasks import run_task

SHIPPED_LISTS = {
    "sd14-memorized": REPO_ROOT / "assets" / "sd14_memorization" / "memorized_laion_prompts.csv",
    "sd14-unmemorized": REPO_ROOT / "assets" / "sd14_memorization" / "unmemorized_laion_prompts.csv",
}
MODEL_SETTINGS = ("model", "device", "dtype")
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
    prompt = row.get("prompt", row.get("caption", row.get("Caption")))
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"item {index} has no prompt (a 'prompt' or 'caption' column): {row}")
    item = dict(id=str(row.get("id", row.get("Index", index))), prompt=prompt)
    if row.get("image") not in (None, ""):
        item["image"] = int(row["image"])
    kind = row.get("type")
    if kind not in (None, ""):
        item["type"] = str(kind)
    return item


def load_items(source: str | Path, model: str | None = None) -> list[dict]:
    """Items `{"id", "prompt", ["image"], ["type"]}` from a prompt list.

    `source`: "bundled" (the memorized captions of `model`, each with its
    training image index), a shipped list name (`SHIPPED_LISTS`), or a CSV
    (',' or ';' separated, a `prompt`/`caption` column, optional `id`, `type`,
    `image`) or JSON file (a list of prompts or of such objects).
    """
    if source == "bundled":
        sidecar = (DEMO_MODEL_DIR if model is None else Path(model)) / MEMORIZED_FILE
        if not sidecar.is_file():
            raise ValueError(f"no list of memorized captions at {sidecar}: give a prompt list file")
        captions = json.loads(sidecar.read_text())["captions"]
        return [dict(id=f"{i:04d}", prompt=caption, image=i) for i, caption in enumerate(captions)]
    path = SHIPPED_LISTS.get(str(source), Path(source))
    if not path.is_file():
        raise FileNotFoundError(f"no prompt list at {path}; give a CSV/JSON file, 'bundled' or one of {sorted(SHIPPED_LISTS)}")
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a JSON prompt list is a list of prompts or of objects")
        rows = [row if isinstance(row, dict) else dict(prompt=row) for row in rows]
    elif path.suffix == ".csv":
        text = path.read_text()
        delimiter = ";" if text.splitlines()[0].count(";") > text.splitlines()[0].count(",") else ","
        rows = [{key.strip(): value for key, value in row.items() if key}
                for row in csv.DictReader(text.splitlines(), delimiter=delimiter)]
    else:
        raise ValueError(f"{path}: a prompt list is a .csv or .json file")
    items = [_item(index, row) for index, row in enumerate(rows)]
    ids = [item["id"] for item in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: item ids are not unique")
    return items


# ---------------------------------------------------------------------------------------------------------------
# One item


def _handle(config: dict) -> ModelHandle:
    key = tuple(config.get(name) for name in MODEL_SETTINGS)
    if key not in _loaded:
        model, device, dtype = key
        _loaded[key] = load_model(model, device=device or "cpu", dtype=dtype or "float32")
    return _loaded[key]


def run_one(item: dict, method: str, config: dict) -> dict:
    """Run `method` (a `run_task` kind) on one item; returns `{"item", "method", "config", "metrics"}`.

    `config`: the task's settings plus `model`, `device`, `dtype`. The item's
    prompt (and training image index, if it has one) are the task's target.
    """
    handle = _handle(config)
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


def _ray_results(pending: list[dict], method: str, config: dict, address: str | None, workers: int | None):
    """Yield (item, result) as Ray tasks finish."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False)
    # Ray starts CPU workers with one torch thread; another thread count sums in another order, and the table would
    # differ from the local executor's in the last digits. So the workers get the driver's count.
    threads = {"env_vars": {"OMP_NUM_THREADS": str(torch.get_num_threads())}}
    remote = ray.remote(num_gpus=1 if torch.cuda.is_available() else 0, runtime_env=threads)(run_one)
    futures = {remote.remote(item, method, config): item for item in pending}
    while futures:
        done, _ = ray.wait(list(futures), num_returns=1)
        yield futures.pop(done[0]), ray.get(done[0])


def run_campaign(items: Sequence[dict], method: str, config: dict, out_dir: str | Path, executor: str = "local",
                 address: str | None = None, workers: int | None = None, min_share: float = MIN_SHARE,
                 callback: Callback | None = None) -> dict:
    """Run `method` on every item not done yet in `out_dir`, then aggregate all of them.

    `callback` receives a `TaskProgress` after each item (`analysis.progress`).
    `workers`: CPUs of a local Ray (None: all). Returns the summary that is
    also written to `OUT/summary.json` (and the table to `OUT/table.md`).
    Raises ValueError when `out_dir` holds a campaign with other settings.
    """
    if method not in SCORES:
        raise ValueError(f"unknown campaign method {method!r}; choose one of {sorted(SCORES)}")
    if executor not in ("local", "ray"):
        raise ValueError(f"unknown executor {executor!r}; choose 'local' or 'ray'")
    if not items:
        raise ValueError("the prompt list is empty")
    out_dir = Path(out_dir)
    (out_dir / ITEMS_FOLDER).mkdir(parents=True, exist_ok=True)
    header = json.loads(json.dumps(dict(method=method, config=config)))
    campaign_file = out_dir / CAMPAIGN_FILE
    if campaign_file.is_file() and json.loads(campaign_file.read_text()) != header:
        raise ValueError(f"{out_dir} holds a campaign with other settings: {campaign_file.read_text()}; "
                         "use another folder or the same settings")
    _write_json(campaign_file, header)

    pending = [item for item in items if not _item_file(out_dir, item).is_file()]
    done = len(items) - len(pending)
    report(callback, "campaign", done, len(items), f"{done} done before")
    results = (((item, run_one(item, method, config)) for item in pending) if executor == "local"
               else _ray_results(pending, method, config, address, workers))
    for item, result in results:
        _write_json(_item_file(out_dir, item), result)
        done += 1
        report(callback, "campaign", done, len(items), item["id"])

    finished = [json.loads(_item_file(out_dir, item).read_text()) for item in items]
    table = aggregate(finished, method, min_share)
    summary = dict(method=method, config=config, items=len(items), computed=len(pending), table=table,
                   table_markdown=table_markdown(table, method, min_share))
    _write_json(out_dir / "summary.json", summary)
    (out_dir / "table.md").write_text(summary["table_markdown"] + "\n")
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
    """Rows `{"group", "items", "similarity_mean", "similarity_std", "mr"}`: all items, then each type."""
    similarity_key, rate_key = SCORES[method]
    groups: dict[str, list[dict]] = {"all": list(results)}
    for result in results:
        if "type" in result["item"]:
            groups.setdefault(result["item"]["type"], []).append(result)
    rows = []
    for group, members in groups.items():
        scored = [m["metrics"] for m in members if similarity_key in m["metrics"]]
        similarities = [metrics[similarity_key] for metrics in scored]
        rows.append(dict(
            group=group, items=len(members), scored=len(scored),
            similarity_mean=statistics.fmean(similarities) if similarities else None,
            # Population std over items, as the tables in the papers report the spread of the items themselves.
            similarity_std=statistics.pstdev(similarities) if similarities else None,
            mr=sum(metrics[rate_key] >= min_share for metrics in scored) / len(scored) if scored else None))
    return rows


def table_markdown(rows: Sequence[dict], method: str, min_share: float = MIN_SHARE) -> str:
    def number(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    lines = [f"| {method}: items | similarity (mean ± std) | MR (share of seeds replicating ≥ {min_share:g}) |",
             "|---|---|---|"]
    lines += [f"| {row['group']} ({row['scored']} of {row['items']} scored) | "
              f"{number(row['similarity_mean'])} ± {number(row['similarity_std'])} | {number(row['mr'])} |"
              for row in rows]
    return "\n".join(lines)
