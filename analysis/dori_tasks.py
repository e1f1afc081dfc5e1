"""The kinds built on Dori's search: "attack" (a search toward a training image, then `evaluate`) and "finetune"
(adversarial fine-tuning against its triggers); see `analysis.tasks`. The search's own settings are
`analysis.dori.DoriSearch`'s fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from analysis.dori import DoriPreview, DoriSearch, DoriStep, Start, evaluate
from analysis.export import RunRecord
from analysis.finetune import (EVALUATION_SEED_OFFSET, AdversarialFineTuning, FineTuneProgress, resolve_targets,
                               side_effects)
from analysis.limits import MAX_SEARCH_STEPS, MAX_SEEDS
from analysis.model import ModelHandle, load_model
from analysis.progress import Callback
from analysis.settings import (DEFAULT_SEEDS, Mitigated, Sampling, Target, as_json, check, defaults, fill, number,
                               seeds_setting, setting, whole, whole_number)
from analysis.task_settings import mitigated, mitigation_config, sampling_settings, target_settings

RANDOM_START = {"kind": "random", "seed": 0, "scale": None}  # scale None: the empty prompt's spread (Start.random)


@dataclass
class AttackSettings(Mitigated, Sampling, Target):
    starts: list[dict] = setting((RANDOM_START,),
                                 "where the searches start: {'kind': 'random', 'seed', 'scale'}, "
                                 "{'kind': 'prompt', 'text'} or {'kind': 'embedding', 'input'}")
    search: dict | None = setting(None, "`DoriSearch`'s settings (null: its defaults)")
    evaluation_seeds: list[int] = seeds_setting(DEFAULT_SEEDS, "seeds each found embedding is generated with")
    preview_every: int = whole(0, "generate the first start's embedding every n search steps (0: never)", 0,
                               MAX_SEARCH_STEPS)
    preview_seeds: int = whole(2, "seeds of each preview", 1, MAX_SEEDS)


@dataclass
class FinetuneSettings:
    targets: list[int] = setting((0,), "indices of the memorized images to train away")
    out_dir: str | None = setting(None, "the folder of the checkpoint and of the tuned model (OUT/model)")
    parameters: dict | None = setting(None, "`AdversarialFineTuning`'s parameters (null: its defaults)")
    resume: bool = setting(False, "continue after the last finished round in out_dir")


def _starts(specs, prompt: str, inputs: dict[str, torch.Tensor]) -> tuple[list[dict], list[Start]]:
    if not isinstance(specs, list) or not specs:
        raise ValueError(f"starts must be a non-empty list, got {specs!r}")
    filled, starts = [], []
    for spec in specs:
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind == "random":
            spec = fill("random start", dict(RANDOM_START), spec)
            scale = None if spec["scale"] is None else number("start scale", spec["scale"], 0)
            starts.append(Start.random(whole_number("start seed", spec["seed"]), scale))
        elif kind == "prompt":
            spec = fill("prompt start", dict(kind="prompt", text=None), spec)
            spec["text"] = prompt if spec["text"] is None else spec["text"]
            starts.append(Start.prompt(spec["text"]))
        elif kind == "embedding":
            spec = fill("embedding start", dict(kind="embedding", input=None), spec)
            if spec["input"] not in inputs:
                raise ValueError(f"embedding start {spec['input']!r} is not among the inputs {sorted(inputs)}")
            starts.append(Start.embedding(inputs[spec["input"]]))
        else:
            raise ValueError(f"a start is {{'kind': 'random'|'prompt'|'embedding', ...}}, got {spec!r}")
        filled.append(spec)
    return filled, starts


def checked_search(what: str, search: dict) -> dict:
    """A filled Dori search configuration held to `DoriSearch`'s ranges (ValueError naming `what`)."""
    for name in ("lr", "steps", "batch_size", "seed"):
        check(DoriSearch, name, search[name], f"{what} {name}")
    return search


def run_attack(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    target, prompt, image = target_settings(handle, config, inputs, need_image=True)
    search = checked_search("search", fill("search", defaults(DoriSearch), config["search"]))
    filled_starts, starts = _starts(config["starts"], prompt, inputs)
    filled = dict(**target, starts=filled_starts, search=as_json(search),
                  evaluation_seeds=check(AttackSettings, "evaluation_seeds", config["evaluation_seeds"]),
                  **sampling_settings(handle, config), mitigation=mitigation_config(config["mitigation"], inputs),
                  **{name: check(AttackSettings, name, config[name]) for name in ("preview_every", "preview_seeds")})
    record = RunRecord("attack", handle.name, filled)
    with mitigated(handle, filled["mitigation"], inputs, prompt, record, callback):
        search_callback = _with_previews(handle, image, filled, record, callback)
        result = DoriSearch(**search).fit(handle, image, starts, prompt=prompt, callback=search_callback)
        before = evaluate(handle, result.starts, image, filled["evaluation_seeds"], filled["steps"],
                          filled["guidance"], callback=callback)
        after = evaluate(handle, result.embeddings, image, filled["evaluation_seeds"], filled["steps"],
                         filled["guidance"], callback=callback)
    final_losses = result.losses[-1].tolist()
    distances = result.from_start.l2.norm(dim=1).tolist()
    record.metrics.update(
        final_loss=final_losses, distance_from_start=distances,
        rate_before=before.rates.tolist(), rate=after.rates.tolist(), mean_rate=after.rates.mean().item(),
        mean_similarity=after.similarities.mean(dim=1).tolist(),
        similarities=after.similarities.tolist(), replicated=after.replicated.int().tolist(),
        similarity=after.similarities.mean().item(), similarity_std=after.similarities.mean(dim=1).std(
            correction=0).item())
    record.table = [dict(start=i, kind=spec["kind"], final_loss=loss, distance_from_start=distance,
                         rate_before=rate_before, rate=rate, mean_similarity=similarity)
                    for i, (spec, loss, distance, rate_before, rate, similarity) in enumerate(zip(
                        filled_starts, final_losses, distances, before.rates.tolist(), after.rates.tolist(),
                        record.metrics["mean_similarity"]))]
    record.images["target"] = image.float().cpu()
    for i, generations in enumerate(after.images):
        record.images.update({f"start{i}_seed{seed}": generated
                              for seed, generated in zip(filled["evaluation_seeds"], generations)})
    record.tensors.update(embeddings=result.embeddings, starts=result.starts, losses=result.losses,
                          token_distance_from_start=result.from_start.l2)
    if result.from_prompt is not None:
        record.tensors["token_distance_from_prompt"] = result.from_prompt.l2
    return record


def _with_previews(handle: ModelHandle, image: torch.Tensor, filled: dict, record: RunRecord,
                   callback: Callback | None) -> Callback | None:
    """The search's callback, which also generates the first start's current embedding every `preview_every` steps
    (with `preview_seeds` seeds, inside the run's mitigation; not at the last step, whose embedding the run generates
    right after): each preview goes to `callback` as a `DoriPreview` and into the record (images
    `preview{STEP}_seed{S}`, metrics `preview_similarities`)."""
    every = filled["preview_every"]
    if not every:
        return callback
    seeds = list(range(filled["preview_seeds"]))
    record.metrics["preview_similarities"] = {}

    def on_step(step: DoriStep) -> None:
        if callback is not None:
            callback(step)
        if (step.index + 1) % every or step.index + 1 == step.total:
            return
        shown = evaluate(handle, step.embeddings[:1], image, seeds, filled["steps"], filled["guidance"])
        preview = DoriPreview(step.index + 1, shown.images[0], shown.similarities[0].tolist())
        record.metrics["preview_similarities"][str(preview.step)] = preview.similarities
        record.images.update({f"preview{preview.step}_seed{seed}": picture
                              for seed, picture in zip(seeds, preview.images)})
        if callback is not None:
            callback(preview)

    return on_step


def run_finetune(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    if not isinstance(config["out_dir"], str) or not config["out_dir"]:
        raise ValueError(f"out_dir must name the folder for the checkpoint and the tuned model, got {config['out_dir']!r}")
    defaults = AdversarialFineTuning().get_params()
    # Only the default surrogate is a JSON value; a mask or an image surrogate is the Python API's.
    defaults.pop("surrogate")
    parameters = fill("finetune parameter", defaults, config["parameters"])
    for name in ("rounds", "triggers_per_image", "steps_per_round", "lr", "eval_seeds"):
        check(AdversarialFineTuning, name, parameters[name], f"finetune {name}")
    parameters["dori"] = checked_search("finetune dori", fill("finetune dori", defaults["dori"], parameters["dori"]))
    filled = dict(targets=config["targets"], out_dir=config["out_dir"], parameters=as_json(parameters),
                  resume=bool(config["resume"]))
    record = RunRecord("finetune", handle.name, filled)
    result = AdversarialFineTuning(**{**parameters, "dori": DoriSearch(**parameters["dori"])}).fit(
        handle, config["targets"], config["out_dir"], callback=callback, resume=filled["resume"])
    last = result.history[-1]["targets"]
    record.metrics.update(
        model_dir=str(result.model_dir), surrogate_sources=result.surrogate_sources,
        normal_pairs=result.normal_pairs, utility_loss=result.utility_loss,
        normal_loss=[row["normal_loss"] for row in result.history],
        adversarial_loss=[row["adversarial_loss"] for row in result.history],
        **{key: [target.get(key) for target in last]
           for key in ("prompt_replication", "prompt_similarity", "dori_replication", "dori_similarity")})
    record.table = [dict(round=row["round"], caption=target["caption"], **{
        key: target.get(key) for key in ("prompt_replication", "prompt_similarity", "dori_replication",
                                         "dori_similarity")}) for row in result.history for target in row["targets"]]
    for caption, images in result.surrogates.items():
        index = [m.caption for m in handle.memorized].index(caption)
        record.images.update({f"surrogate{index}_{k}": image for k, image in enumerate(images)})

    def on_step(step) -> None:
        if callback is not None:
            callback(FineTuneProgress(len(result.history) - 1, len(result.history), "side effects", step.index,
                                      step.total))

    seeds = range(EVALUATION_SEED_OFFSET, EVALUATION_SEED_OFFSET + parameters["eval_seeds"])
    effects = side_effects(handle, load_model(result.model_dir, device=handle.device, dtype=handle.dtype,
                                              replication_metric=handle.replication_metric),
                           resolve_targets(handle, config["targets"]), seeds, on_step)
    record.metrics.update(others=effects["others"],
                          held_out=[dict(prompt=row["prompt"], similarity=row["similarity"])
                                    for row in effects["held_out"]])
    for k, row in enumerate(effects["held_out"]):
        record.images.update({f"held_out{k}_before": row["before"][0], f"held_out{k}_after": row["after"][0]})
    return record
