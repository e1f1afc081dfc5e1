import pytest
import torch

from analysis.hooks import hook_points
from analysis.masks import Mask, iou


def bools(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


def tiny_mask(handle, seed: int = 0) -> Mask:
    """Neurons blocked in one value layer and single weights removed in one feed-forward layer."""
    generator = torch.Generator().manual_seed(seed)
    value = hook_points(handle.unet, "value")["mid.attn.0.to_v"]
    ff_out = hook_points(handle.unet, "ff")["up.0.attn.1.ff.out"]
    return Mask({"mid.attn.0.to_v": torch.rand(value.out_features, generator=generator) > 0.7,
                 "up.0.attn.1.ff.out": torch.rand(ff_out.weight.shape, generator=generator) > 0.9},
                method="test", prompt="a photo of the red lighthouse", model=handle.name,
                parameters={"seeds": [0, 1], "threshold": 0.123456789, "nested": {"k": None}})


def unet_output(unet) -> torch.Tensor:
    """The UNet's noise prediction on fixed random inputs."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, 16, generator=generator)
    y = torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        return unet(x, 500, encoder_hidden_states=y).sample


def test_round_trip_through_file(tiny_handle, tmp_path):
    mask = tiny_mask(tiny_handle)
    mask.save(tmp_path / "mask.safetensors")
    loaded = Mask.load(tmp_path / "mask.safetensors")
    assert list(loaded.removed) == list(mask.removed)
    for name in mask.removed:
        assert torch.equal(loaded.removed[name], mask.removed[name])
    assert (loaded.method, loaded.prompt, loaded.model, loaded.parameters) == (
        mask.method, mask.prompt, mask.model, mask.parameters)
    assert loaded.counts() == mask.counts()


def test_counts_and_type_check():
    mask = Mask({"a": bools(1, 0, 1), "b": torch.zeros(2, 3, dtype=torch.bool)}, "test", "p", "m")
    assert mask.counts() == {"a": 2, "b": 0}
    with pytest.raises(ValueError, match="bool"):
        Mask({"a": torch.ones(3)}, "test", "p", "m")


def test_iou_per_layer_with_undefined_layers():
    first = Mask({"a": bools(1, 1, 0, 0), "b": bools(0, 0), "c": bools(1, 0), "d": bools(1, 1)}, "test", "p", "m")
    second = Mask({"a": bools(0, 1, 1, 0), "b": bools(0, 0), "c": bools(0, 1), "d": bools(1, 1)}, "test", "p", "m")
    only_first = Mask({"e": bools(1, 0)}, "test", "p", "m")
    assert iou(first, second) == {"a": 1 / 3, "b": None, "c": 0.0, "d": 1.0}
    assert iou(first, only_first)["e"] == 0.0
    assert iou(first, Mask({"b": bools(0, 0)}, "test", "p", "m"))["b"] is None
    with pytest.raises(ValueError, match="shape"):
        iou(first, Mask({"a": bools(1)}, "test", "p", "m"))


def test_applied_equals_baked_and_is_undone(tiny_handle):
    mask = tiny_mask(tiny_handle)
    before = unet_output(tiny_handle.unet)
    with mask.applied(tiny_handle):
        during = unet_output(tiny_handle.unet)
    assert not torch.allclose(during, before)
    assert torch.equal(unet_output(tiny_handle.unet), before)

    baked = mask.baked(tiny_handle.unet)
    torch.testing.assert_close(unet_output(baked), during, rtol=0, atol=1e-5)
    value = hook_points(baked, "value")["mid.attn.0.to_v"]
    assert (value.weight[mask.removed["mid.attn.0.to_v"]] == 0).all()
    assert torch.equal(unet_output(tiny_handle.unet), before)  # baking copies


def test_applied_restores_weights_after_an_exception(tiny_handle):
    mask = tiny_mask(tiny_handle)
    layers = {**hook_points(tiny_handle.unet, "value"), **hook_points(tiny_handle.unet, "ff")}
    originals = {name: layers[name].weight.clone() for name in mask.removed}
    with pytest.raises(RuntimeError, match="boom"):
        with mask.applied(tiny_handle.unet):
            assert (layers["up.0.attn.1.ff.out"].weight[mask.removed["up.0.attn.1.ff.out"]] == 0).all()
            raise RuntimeError("boom")
    for name, original in originals.items():
        assert torch.equal(layers[name].weight, original)
        assert len(layers[name]._forward_hooks) == 0
