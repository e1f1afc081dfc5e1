import shutil

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from analysis.model import ModelLoadError, PassThroughCodec, load_model


def test_loads_pipeline_folder(tiny_model_dir, tiny_handle):
    handle = load_model(tiny_model_dir)
    assert isinstance(handle.tokenizer, CLIPTokenizer)
    assert isinstance(handle.text_encoder, CLIPTextModel)
    assert isinstance(handle.unet, UNet2DConditionModel)
    assert isinstance(handle.scheduler, DDIMScheduler)
    assert isinstance(handle.codec, PassThroughCodec) and handle.pixel_space
    assert handle.latent_shape == tiny_handle.latent_shape
    assert handle.dtype == torch.float32 and handle.device == torch.device("cpu")
    assert not handle.unet.training and not any(p.requires_grad for p in handle.unet.parameters())
    for name, weight in tiny_handle.unet.state_dict().items():
        torch.testing.assert_close(handle.unet.state_dict()[name], weight, rtol=0, atol=0)


def test_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "no_model_here"
    with pytest.raises(ModelLoadError, match="no_model_here"):
        load_model(missing)


def test_empty_folder_lists_every_missing_part(tmp_path):
    with pytest.raises(ModelLoadError, match="missing unet/, text_encoder/, tokenizer/, scheduler/"):
        load_model(tmp_path)


def test_partial_folder_lists_the_missing_parts(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir / "unet", tmp_path / "unet")
    with pytest.raises(ModelLoadError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert "text_encoder/, tokenizer/, scheduler/" in message and "missing unet/" not in message


@pytest.mark.parametrize("local_files_only", [True, False])
def test_unreachable_hub_id_names_the_id(local_files_only):
    # tests/tiny_model.py (imported by conftest) sets HF_HUB_OFFLINE=1, so the plain call fails fast as well.
    with pytest.raises(ModelLoadError, match="nobody/no-such-model"):
        load_model("nobody/no-such-model", local_files_only=local_files_only)


@pytest.mark.parametrize("source", ["not a model", "a/b/c", "./relative/missing"])
def test_neither_path_nor_hub_id(source):
    with pytest.raises(ModelLoadError, match="not a hub id"):
        load_model(source)


def test_bad_dtype(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(tiny_model_dir, dtype="float13")


def test_pickled_weights_are_refused_with_how_to_convert(tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"a pickle is never opened")
    with pytest.raises(ModelLoadError, match="only PyTorch .bin weights.*safe_serialization=True"):
        load_model(folder)


def test_the_bundled_model_has_its_held_out_captions_as_controls():
    handle = load_model(None)
    assert [control.caption for control in handle.controls] == handle.held_out_prompts
    assert all(control.image.shape == handle.memorized[0].image.shape for control in handle.controls)
