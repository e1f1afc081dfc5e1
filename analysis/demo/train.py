"""Train the bundled demo model from scratch.

    python -m analysis.demo.train --out assets/demo_model --steps 20000 --device cuda

Seeded; a progress bar on stderr; a checkpoint every `--checkpoint-every`
steps in `--work-dir` that `--resume` continues from. `--init-from` starts from
a model folder this script wrote (its EMA UNet) under a new recipe, e.g. to
train photos that are not yet memorized longer, with `--photo-weights`:

    python -m analysis.demo.train --init-from assets/demo_model --out /tmp/demo_model \
        --steps 3000 --batch-size 32 --lr 2e-4 --warmup 100 --photo-share 0.5 --photo-weights 1 1 1 6 6 1 1 1

The result is a standard
pipeline folder (see `architecture.save_pipeline_folder`) plus
`memorized.json` (the photos and their captions, the held-out prompts) and
`training.json` (the recipe, steps, wall time, hardware, loss curve).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from analysis.demo.architecture import build_scheduler, build_text_encoder, build_tokenizer, build_unet
from analysis.demo.data import DemoDataset
from analysis.memorized import MEMORIZED_FILE
from analysis.model import save_pipeline_folder


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("assets/demo_model"))
    p.add_argument("--work-dir", type=Path, default=Path("runs/demo_train"), help="checkpoints")
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--photo-share", type=float, default=0.15)
    p.add_argument("--photo-weights", type=float, nargs="+", default=None,
                   help="relative sampling weight of each photo, in memorized.json order (default: uniform)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue this model folder: its tokenizer and text encoder, its UNet as the start of the UNet "
                        "and its EMA (instead of a random init)")
    p.add_argument("--data", default="v1", choices=["v1", "v2"],
                   help="v1: the bundled model's 8 photos; v2: 24 images duplicated like LAION's (data.PHOTOS_V2)")
    p.add_argument("--text-encoder", type=Path, default=None,
                   help="a folder with tokenizer/ and text_encoder/ (e.g. from analysis.demo.text_encoder), kept frozen, "
                        "instead of a random one (with --init-from: instead of the folder's)")
    p.add_argument("--coco-share", type=float, default=0.0,
                   help="share of captioned procedural items that get a random COCO caption instead (0: off)")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--offset-noise", type=float, default=0.0,
                   help="std of a per-image, per-channel constant added to the training noise (0: off)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA, or a CPU with AVX-512 BF16 / AMX)")
    p.add_argument("--channels-last", action="store_true", help="the UNet and its inputs in channels_last memory format")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=2000)
    p.add_argument("--resume", action="store_true",
                   help="continue from --work-dir's checkpoint (bit for bit), or else from --compact's")
    p.add_argument("--compact", type=Path, default=None,
                   help="also keep a compact checkpoint here at every checkpoint: the UNet, its EMA, the step and the "
                        "random states in float32, without AdamW's moments (half the size; small enough to commit)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this long, checkpoint and save the model as it is; --resume continues")
    return p.parse_args(argv)


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to zero: a low final rate sharpens the memorized details."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class CaptionCache:
    """The text encoder is frozen, so each caption's embedding is computed once."""

    def __init__(self, tokenizer, text_encoder, device):
        self.tokenizer, self.text_encoder, self.device = tokenizer, text_encoder, device
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        new = sorted({c for c in captions if c not in self.cache})
        if new:
            ids = self.tokenizer(new, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
            for caption, emb in zip(new, self.text_encoder(ids).last_hidden_state):
                self.cache[caption] = emb
        return torch.stack([self.cache[c] for c in captions])


def init_from(folder: Path, unet: torch.nn.Module) -> tuple[CLIPTokenizer, CLIPTextModel, dict | None]:
    """Load `folder`'s tokenizer and text encoder, copy its UNet weights into `unet`; return the folder's training record too.

    The tokenizer is loaded, not rebuilt: the UNet learned the folder's token ids, and the shipped model's tokenizer
    came from the `tokenizers` BPE trainer (ties in hash order), so `build_tokenizer` gives some of its tokens other ids.
    """
    folder = Path(folder)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
        text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), use_safetensors=True)
        unet.load_state_dict(load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")))
    except (OSError, RuntimeError, ValueError) as err:
        raise SystemExit(f"--init-from {folder}: not a demo model folder of this architecture ({err})") from err
    record = folder / "training.json"
    return tokenizer, text_encoder, json.loads(record.read_text()) if record.exists() else None


def load_text_encoder(folder: Path) -> tuple[CLIPTokenizer, CLIPTextModel]:
    try:
        return (CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
                CLIPTextModel.from_pretrained(str(folder / "text_encoder"), use_safetensors=True))
    except (OSError, ValueError) as err:
        raise SystemExit(f"--text-encoder {folder}: no tokenizer/ and text_encoder/ there ({err})") from err


def save_compact(state: dict, path: Path) -> None:
    """`state`'s weights as one safetensors file, its step, loss curve and random states in the file's metadata."""
    tensors = {f"unet.{k}": v.contiguous() for k, v in state["unet"].items()}
    tensors |= {f"ema.{k}": v.contiguous() for k, v in state["ema"].items()}
    tensors |= {"data_rng": state["data_rng"], "torch_rng": state["torch_rng"]}
    meta = {k: json.dumps(state[k]) for k in ("step", "losses", "elapsed", "running")}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in tensors.items()}, str(path.with_suffix(".tmp")), metadata=meta)
    path.with_suffix(".tmp").replace(path)


def load_compact(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state = {k: json.loads(meta[k]) for k in ("step", "losses", "elapsed", "running")}
    for part in ("unet", "ema"):
        state[part] = {k.removeprefix(f"{part}."): v for k, v in tensors.items() if k.startswith(f"{part}.")}
    return state | {"data_rng": tensors["data_rng"], "torch_rng": tensors["torch_rng"]}


def training_step(unet, ema, optimizer, data: DemoDataset, embed: CaptionCache, alphas: torch.Tensor, args) -> float:
    """One optimiser step on a fresh batch (ε-prediction MSE), then the EMA update; returns the batch loss.

    `args` gives batch_size, offset_noise, ema_decay, bf16 and channels_last; the caller sets the learning rate.
    """
    device = alphas.device
    images, captions = data.sample(args.batch_size)
    x0 = images.to(device)
    cond = embed(captions)
    noise = torch.randn_like(x0)
    # SD's schedule keeps some of the image's mean at the last step, so a model trained on plain noise cannot
    # move a sample's overall brightness far from the data's: dark photos come out washed out. A constant
    # offset in the noise teaches it to (offset noise, Guttenberg 2023).
    if args.offset_noise:
        noise = noise + args.offset_noise * torch.randn(x0.shape[0], x0.shape[1], 1, 1, device=device)
    t = torch.randint(0, len(alphas), (x0.shape[0],), device=device)
    a = alphas[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    if args.channels_last:
        xt = xt.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        pred = unet(xt, t, cond).sample
    loss = F.mse_loss(pred.float(), noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    optimizer.step()
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), unet.parameters()):
            pe.lerp_(p, 1 - args.ema_decay)
    return loss.item()


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    data = DemoDataset(photo_share=args.photo_share, caption_dropout=args.caption_dropout, seed=args.seed,
                       photo_weights=args.photo_weights, recipe=args.data, coco_share=args.coco_share)
    unet = build_unet(seed=args.seed).to(device).train()
    if args.init_from:
        tokenizer, text_encoder, previous = init_from(args.init_from, unet)
    elif args.text_encoder:
        previous = None
    else:
        tokenizer = build_tokenizer(data.all_captions())
        text_encoder, previous = build_text_encoder(len(tokenizer), seed=args.seed), None
    if args.text_encoder:  # with --init-from: the UNet learns to read the new encoder
        tokenizer, text_encoder = load_text_encoder(args.text_encoder)
    text_encoder = text_encoder.to(device).eval().requires_grad_(False)
    if args.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    scheduler = build_scheduler()
    alphas = scheduler.alphas_cumprod.to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    embed = CaptionCache(tokenizer, text_encoder, device)

    args.work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.work_dir / "checkpoint.pt"
    step, losses, elapsed, running = 0, [], 0.0, None
    if args.resume and (ckpt_path.exists() or (args.compact and args.compact.exists())):
        full = ckpt_path.exists()
        ckpt = torch.load(ckpt_path, map_location=device) if full else load_compact(args.compact)
        unet.load_state_dict(ckpt["unet"])
        ema.load_state_dict(ckpt["ema"])
        if full:
            optimizer.load_state_dict(ckpt["optimizer"])
        else:
            print(f"resuming from the compact checkpoint {args.compact}: AdamW's moments start again", flush=True)
        data.generator.set_state(ckpt["data_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        step, losses, elapsed, running = ckpt["step"], ckpt["losses"], ckpt["elapsed"], ckpt["running"]

    def checkpoint():
        state = dict(unet=unet.state_dict(), ema=ema.state_dict(), data_rng=data.generator.get_state(),
                     torch_rng=torch.get_rng_state(), step=step, losses=losses, elapsed=elapsed, running=running)
        # Written aside and renamed, so a machine lost mid-write leaves the previous checkpoint whole.
        torch.save(dict(state, optimizer=optimizer.state_dict()), ckpt_path.with_suffix(".tmp"))
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)
        if args.compact:
            save_compact(state, args.compact)

    start = time.time() - elapsed
    session_start = time.time()
    bar = tqdm(total=args.steps, initial=step, desc="train demo model", dynamic_ncols=True)
    while step < args.steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        loss = training_step(unet, ema, optimizer, data, embed, alphas, args)
        step += 1
        running = loss if running is None else 0.98 * running + 0.02 * loss
        if step % 50 == 0:
            losses.append((step, running))
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr_at(step, args):.1e}")
        bar.update(1)
        elapsed = time.time() - start
        if step % args.checkpoint_every == 0:
            checkpoint()
        if args.max_minutes is not None and time.time() - session_start > 60 * args.max_minutes:
            print(f"time limit: stopping at step {step} of {args.steps}; --resume continues", flush=True)
            break
    bar.close()
    checkpoint()

    save_pipeline_folder(args.out, tokenizer, text_encoder.cpu(), ema.cpu().to(memory_format=torch.contiguous_format),
                         scheduler)
    save_file({"images": data.photos.contiguous()}, str(args.out / "memorized.safetensors"))
    (args.out / MEMORIZED_FILE).write_text(json.dumps({
        "captions": data.photo_captions,
        "images_file": "memorized.safetensors",
        # Guidance 3 keeps the 32x32 samples from saturating (guidance 7 washes colours out).
        "sampling": {"steps": 10, "guidance": 3.0},
        "training": {"offset_noise": args.offset_noise},
        "held_out_prompts": [s.caption for s in data.held_out_specs],
        "train_prompts": [s.caption for s in data.train_specs],
    }, indent=1))
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    (args.out / "training.json").write_text(json.dumps({
        "recipe": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "steps": step, "wall_time_s": round(elapsed, 1), "hardware": hardware,
        "torch": torch.__version__, "final_loss": running, "loss_curve": losses,
        "continued_from": previous,
    }, indent=1))
    print(f"saved {args.out} after {step} steps in {elapsed / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
