"""Loading a Stable Diffusion model into one handle.

`load_model(None)` opens the bundled demo model in `assets/demo_model`;
`load_model("path/or/hub-id")` opens any diffusers Stable Diffusion 1.x/2.x
pipeline folder (safetensors only). Components are loaded one by one, so no
safety checker or feature extractor is needed.

What the model is analysed against travels with it: its memorized images
(`--memorized DIR`, an imagefolder set, or the folder's `memorized.json`;
`analysis.memorized`), its non-memorized reference prompts (`--reference-prompts
FILE`, the sidecar's held-out prompts, or else SD v1.4's 500 unmemorized LAION
prompts) and the metric replication is judged with (`analysis.metrics.ReplicationMetric`).

The demo model works in pixel space: its image codec is `PassThroughCodec`,
which has the interface of diffusers' `AutoencoderKL` (`encode`, `decode`,
`config.scaling_factor`) but does nothing. That keeps a single code path for
SD's VAE and for the demo model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from transformers import CLIPTextModel, CLIPTokenizer

from analysis.memorized import (MEMORIZED_FILE, METADATA_FILES, REFERENCE_PROMPTS_FILE, MemorizedImage,
                                MemorizedSetError, load_memorized_set, read_prompt_list, read_sidecar, shown_name)
from analysis.metrics import PIXEL_CORRELATION, ReplicationMetric, replication_metric
from analysis.paths import REPO_ROOT

DEMO_MODEL_DIR = REPO_ROOT / "assets" / "demo_model"
CODEC_SUBFOLDER = "codec"
CONTROLS_SUBFOLDER = "controls"  # optional: an imagefolder of images the model never trained on


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names every place that was tried."""


class PassThroughCodec(ModelMixin, ConfigMixin):
    """Identity image codec for pixel-space models, shaped like `AutoencoderKL`.

    `block_out_channels` has one entry so that diffusers pipelines compute a
    spatial scale factor of 1.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, latent_channels: int = 3, sample_size: int = 32, scaling_factor: float = 1.0,
                 block_out_channels: tuple[int, ...] = (3,)):
        super().__init__()
        # ModelMixin needs at least one parameter to report a device and dtype.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def encode(self, images: torch.Tensor):
        raise NotImplementedError("use `encode_images` from analysis.model; the codec is the identity")

    def decode(self, latents: torch.Tensor, return_dict: bool = True, generator=None):
        return DecoderOutput(sample=latents) if return_dict else (latents,)


@dataclass
class ModelHandle:
    """Every component an analysis needs, on one device and dtype."""

    name: str
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    codec: AutoencoderKL | PassThroughCodec
    scheduler: DDIMScheduler
    device: torch.device
    dtype: torch.dtype
    memorized: list[MemorizedImage] = field(default_factory=list)
    # Non-memorized prompts: the reference set of NeMo, Wanda, the trigger map and side-effect checks.
    held_out_prompts: list[str] = field(default_factory=list)
    # Sampling settings the model is meant to be used with (StableDiffusionPipeline's by default).
    default_steps: int = 50
    default_guidance: float = 7.5
    # The noise offset the model was trained with (offset noise; 0 for SD): fine-tuning keeps training with it.
    training_offset_noise: float = 0.0
    # How replication is judged (analysis.metrics.ReplicationMetric): pixel correlation unless SSCD is given.
    replication_metric: ReplicationMetric = PIXEL_CORRELATION
    # Where the memorized set and reference prompts came from when given apart from the model folder (else None).
    memorized_set: str | None = None
    reference_prompts_file: str | None = None
    # Ordinary image-caption pairs for fine-tuning's normal term (`--normal DIR`, analysis.normal); without them the
    # model generates its own for `train_prompts`, the captions of its ordinary training data (its folder's
    # sidecar lists them; for SD, COCO captions stand in).
    normal_set: str | None = None
    train_prompts: list[str] = field(default_factory=list)
    # Images the model never trained on, with captions (the folder's `controls/`): a Dori search toward one should
    # fail, the control of the paper's table and of the Perturb view.
    controls: list[MemorizedImage] = field(default_factory=list)

    def data_settings(self) -> dict:
        """What the model is analysed against, as `load_model` takes it again: every record keeps it."""
        return dict(memorized_set=self.memorized_set, reference_prompts=self.reference_prompts_file,
                    normal_set=self.normal_set, replication=self.replication_metric.settings())

    @property
    def image_size(self) -> int:
        """The side of the images the model makes: the latent size times the VAE's downsampling factor."""
        return self.unet.config.sample_size * 2 ** (len(self.codec.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    @property
    def pixel_space(self) -> bool:
        return isinstance(self.codec, PassThroughCodec)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> model latents (scaled as the UNet sees them)."""
        images = images.to(self.device, self.dtype)
        if self.pixel_space:
            return images
        latents = self.codec.encode(images).latent_dist.mean
        return latents * self.codec.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Model latents -> images in [-1, 1]."""
        latents = latents / self.codec.config.scaling_factor
        return self.codec.decode(latents, return_dict=False)[0].clamp(-1, 1)


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if not isinstance(dtype, str) or dtype not in table:  # a recorded configuration may hold any JSON value
        raise ValueError(f"unknown dtype {repr(dtype)[:80]}; choose one of {sorted(table)}")
    return table[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device that exists on this machine; ModelLoadError saying why not (an unknown name, no
    CUDA, a CUDA index beyond the devices there are), before anything is loaded onto it."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"unknown device {repr(device)[:80]}; e.g. cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelLoadError(f"device {device}: this machine (or this torch build) has no CUDA device")
        if device.index is not None and device.index >= count:
            raise ModelLoadError(f"device {device}: there are {count} CUDA devices (cuda:0 to cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device}: MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"device {device}: Dori Lab runs on cpu, cuda or mps")
    return device


def _read_sidecar(folder: Path) -> dict:
    """What `memorized.json` beside a model says besides its images: held-out prompts, sampling and training settings."""
    if not (folder / MEMORIZED_FILE).is_file():
        return {}
    path, meta = read_sidecar(folder)
    try:
        found = dict(held_out_prompts=_texts(meta.get("held_out_prompts", [])),
                     train_prompts=_texts(meta.get("train_prompts", [])))
        if "sampling" in meta:
            found.update(default_steps=int(meta["sampling"]["steps"]),
                         default_guidance=float(meta["sampling"]["guidance"]))
        if "training" in meta:
            found.update(training_offset_noise=float(meta["training"]["offset_noise"]))
    except (KeyError, TypeError, ValueError) as err:
        raise MemorizedSetError(f"{path}: held_out_prompts and train_prompts must be lists of texts, sampling "
                                f"{{steps, guidance}} and training {{offset_noise}} numbers ({type(err).__name__}: "
                                f"{shown_name(err.args[0] if err.args else '')})") from None
    return found


def _texts(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TypeError("not a list of texts")
    return value


def _refuse_pickled_weights(folder: Path) -> None:
    """ModelLoadError if a component has only pickled `.bin` weights: unpickling a file can run code, so only
    safetensors are loaded; the message says how to convert the folder once."""
    for sub in ("unet", "text_encoder", "vae"):
        weights = folder / sub
        if weights.is_dir() and any(weights.glob("*.bin")) and not any(weights.glob("*.safetensors")):
            raise ModelLoadError(
                f"{weights.resolve()} holds only PyTorch .bin weights, which Dori Lab does not load (unpickling can "
                "run code). Convert the folder once, where you trust it: python -c \"from diffusers import "
                f"StableDiffusionPipeline as P; P.from_pretrained('{folder.resolve()}', use_safetensors=False)"
                f".save_pretrained('{folder.resolve()}', safe_serialization=True)\"")


def load_model(source: str | Path | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype | str = torch.float32, local_files_only: bool = False,
               memorized: str | Path | None = None, reference_prompts: str | Path | None = None,
               replication_metric: ReplicationMetric | None = None, normal: str | Path | None = None) -> ModelHandle:
    """Load a Stable Diffusion pipeline's components into a `ModelHandle`.

    `source` is a local folder or a hub id; None means the bundled demo model.
    `memorized`: a memorized set folder (`analysis.memorized.load_memorized_set`) instead of the model
    folder's `memorized.json`; `reference_prompts`: a prompt list file instead of the sidecar's held-out
    prompts (without either, SD v1.4's unmemorized LAION prompts); `replication_metric`: an
    `analysis.metrics.ReplicationMetric` (None: pixel correlation); `normal`: an imagefolder of ordinary pairs
    for fine-tuning (`analysis.normal`; its images are read when fine-tuning starts).
    Raises `ModelLoadError` naming what was tried when it cannot be loaded, and
    `analysis.memorized.MemorizedSetError` (a ValueError) for a bad memorized set.
    """
    device = resolve_device(device)
    dtype = _resolve_dtype(dtype)
    source = DEMO_MODEL_DIR if source is None else source
    folder = Path(source).expanduser()
    is_local = folder.exists()
    if not is_local and (str(source).startswith((".", "/", "~")) or str(source).count("/") != 1):
        raise ModelLoadError(f"no model folder at {folder.resolve()} (and {str(source)!r} is not a hub id of the form owner/name)")
    if is_local:
        missing = [sub for sub in ("unet", "text_encoder", "tokenizer", "scheduler") if not (folder / sub).is_dir()]
        if missing:
            raise ModelLoadError(
                f"{folder.resolve()} is not a Stable Diffusion pipeline folder: missing {', '.join(f'{sub}/' for sub in missing)} "
                "(expected unet/, text_encoder/, tokenizer/, scheduler/ and vae/ or codec/)")
        _refuse_pickled_weights(folder)
    where = str(folder.resolve()) if is_local else f"hub id {source!r}"
    kwargs = dict(local_files_only=local_files_only)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(source), subfolder="tokenizer", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(str(source), subfolder="text_encoder", use_safetensors=True,
                                                     dtype=dtype, **kwargs)
        unet = UNet2DConditionModel.from_pretrained(str(source), subfolder="unet", use_safetensors=True,
                                                    torch_dtype=dtype, **kwargs)
        scheduler = DDIMScheduler.from_pretrained(str(source), subfolder="scheduler", **kwargs)
        if is_local and (folder / CODEC_SUBFOLDER).is_dir():
            # The codec has no weights, so it is built from its config alone.
            codec = PassThroughCodec.from_config(PassThroughCodec.load_config(str(folder / CODEC_SUBFOLDER)))
        else:
            codec = AutoencoderKL.from_pretrained(str(source), subfolder="vae", use_safetensors=True,
                                                  torch_dtype=dtype, **kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised with the place that was tried
        raise ModelLoadError(f"could not load a Stable Diffusion pipeline from {where}: {type(err).__name__}: {err}") from err

    for module in (text_encoder, unet, codec):
        module.to(device).eval().requires_grad_(False)
    handle = ModelHandle(
        name="bundled demo model" if folder == DEMO_MODEL_DIR else str(source),
        tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, codec=codec,
        scheduler=scheduler, device=device, dtype=dtype,
        **(_read_sidecar(folder) if is_local else {}),
    )
    if memorized is not None:
        handle.memorized_set = str(Path(memorized).expanduser().resolve())
        handle.memorized = load_memorized_set(memorized, tokenizer, handle.image_size)
    elif is_local and (folder / MEMORIZED_FILE).is_file():
        handle.memorized = load_memorized_set(folder, tokenizer, handle.image_size)
    if is_local and (folder / CONTROLS_SUBFOLDER).is_dir():
        handle.controls = load_memorized_set(folder / CONTROLS_SUBFOLDER, tokenizer, handle.image_size)
    if reference_prompts is not None:
        handle.reference_prompts_file = str(Path(reference_prompts).expanduser().resolve())
        handle.held_out_prompts = read_prompt_list(reference_prompts)
    elif not handle.held_out_prompts:
        handle.held_out_prompts = read_prompt_list(REFERENCE_PROMPTS_FILE)
    if replication_metric is not None:
        handle.replication_metric = replication_metric
    if normal is not None:
        handle.normal_set = str(Path(normal).expanduser().resolve())
        if not any((Path(handle.normal_set) / name).is_file() for name in METADATA_FILES):
            raise ValueError(f"no normal set at {handle.normal_set}: expected a folder of images with "
                             f"{' or '.join(METADATA_FILES)} (columns file_name and text or caption)")
    return handle


def open_model(model: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | str = "float32",
               memorized: str | Path | None = None, reference_prompts: str | Path | None = None,
               sscd: str | Path | None = None, sscd_threshold: float | None = None,
               normal: str | Path | None = None) -> ModelHandle:
    """`load_model` with the command-line options (`dori --help`, `python app.py --help`): SSCD as the replication
    metric when `sscd` is given. ValueError for a threshold without SSCD or a bad SSCD file."""
    if sscd is None and sscd_threshold is not None:
        raise ValueError("--sscd-threshold needs --sscd (the SSCD TorchScript file)")
    device, dtype = resolve_device(device), _resolve_dtype(dtype)
    metric = replication_metric(sscd, sscd_threshold, device) if sscd is not None else None
    return load_model(model, device=device, dtype=dtype, memorized=memorized, reference_prompts=reference_prompts,
                      replication_metric=metric, normal=normal)


def save_pipeline_folder(folder: Path, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel,
                         unet: UNet2DConditionModel, scheduler: DDIMScheduler, vae: AutoencoderKL | None = None) -> None:
    """Write the standard diffusers layout that `load_model` reads: `vae/` when given, else the pixel-space `codec/`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    if vae is not None:
        vae.save_pretrained(folder / "vae", safe_serialization=True)
        return
    PassThroughCodec(latent_channels=unet.config.in_channels, sample_size=unet.config.sample_size).save_pretrained(
        folder / CODEC_SUBFOLDER)
