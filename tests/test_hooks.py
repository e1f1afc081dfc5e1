import pytest
import torch
from diffusers import UNet2DConditionModel

from analysis.hooks import (InputSquaredNorm, MeanAbsOutput, hook_points, hooked, nemo_layers, resolve_layers,
                            zero_outputs)
from tiny_model import build_tiny_handle


def test_names_are_stable_across_builds(tiny_handle):
    other = build_tiny_handle(seed=1)
    for kind in ("value", "ff"):
        assert list(hook_points(tiny_handle.unet, kind)) == list(hook_points(other.unet, kind))
    assert list(hook_points(tiny_handle.unet, "value")) == [
        "down.1.attn.0.to_v", "mid.attn.0.to_v", "up.0.attn.0.to_v", "up.0.attn.1.to_v"]
    assert list(hook_points(tiny_handle.unet, "ff", parts=("mid",))) == ["mid.attn.0.ff.in", "mid.attn.0.ff.out"]
    assert list(nemo_layers(tiny_handle.unet)) == ["down.1.attn.0.to_v", "mid.attn.0.to_v"]


def test_every_cross_attention_is_covered(tiny_handle):
    unet = tiny_handle.unet
    value_layers = {id(layer) for layer in hook_points(unet, "value").values()}
    cross_attention_values = [module.to_v for name, module in unet.named_modules() if name.endswith("attn2")]
    assert cross_attention_values and {id(layer) for layer in cross_attention_values} == value_layers
    feed_forward_outputs = [module.net[2] for name, module in unet.named_modules() if name.endswith(".ff")]
    assert {id(m) for m in feed_forward_outputs} <= {id(layer) for layer in hook_points(unet, "ff").values()}


def test_several_transformer_blocks_get_a_block_index():
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, norm_num_groups=8, attention_head_dim=4, transformer_layers_per_block=2)
    names = list(hook_points(unet, "value", parts=("down",)))
    assert names == ["down.1.attn.0.block.0.to_v", "down.1.attn.0.block.1.to_v"]
    assert resolve_layers(unet, names[1:])[names[1]] is unet.down_blocks[1].attentions[0].transformer_blocks[1].attn2.to_v


def test_unknown_names_are_refused(tiny_handle):
    with pytest.raises(KeyError, match="down.7"):
        resolve_layers(tiny_handle.unet, ["down.7.attn.0.to_v"])
    with pytest.raises(ValueError, match="kind"):
        hook_points(tiny_handle.unet, "keys")


def test_hooks_and_weights_restored_after_an_exception(tiny_handle):
    layers = hook_points(tiny_handle.unet, "ff")
    name = "mid.attn.0.ff.out"
    original = layers[name].weight.clone()
    keep = torch.rand(original.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    with pytest.raises(RuntimeError, match="boom"):
        with hooked(tiny_handle.unet, forward_hooks={name: MeanAbsOutput()}, weight_masks={name: keep}):
            assert torch.equal(layers[name].weight, original * keep)
            assert len(layers[name]._forward_hooks) == 1
            raise RuntimeError("boom")
    assert len(layers[name]._forward_hooks) == 0
    assert torch.equal(layers[name].weight, original)


def test_blocked_neurons_output_exactly_zero(tiny_handle):
    name = "mid.attn.0.to_v"
    layer = hook_points(tiny_handle.unet, "value")[name]
    removed = torch.zeros(layer.out_features, dtype=torch.bool)
    removed[[1, 5]] = True
    y = torch.randn(2, 77, layer.in_features)
    with torch.no_grad(), hooked(tiny_handle.unet, forward_hooks={name: zero_outputs(removed)}):
        blocked = layer(y)
    assert (blocked[..., removed] == 0).all()
    assert torch.equal(blocked[..., ~removed], layer(y).detach()[..., ~removed])


def test_recorders_reduce_as_documented(tiny_handle):
    name = "mid.attn.0.ff.out"
    layer = hook_points(tiny_handle.unet, "ff")[name]
    inputs = [torch.randn(2, 6, layer.in_features), torch.randn(3, 4, layer.in_features)]
    outputs, norms = MeanAbsOutput(), InputSquaredNorm()
    with torch.no_grad(), hooked(tiny_handle.unet, forward_hooks={name: outputs}):
        with hooked(tiny_handle.unet, forward_hooks={name: norms}):
            for x in inputs:
                layer(x)
    torch.testing.assert_close(outputs.rows(), torch.cat([layer(x).abs().mean(dim=1) for x in inputs]))
    every_token = torch.cat([x.reshape(-1, layer.in_features) for x in inputs])
    torch.testing.assert_close(norms.norms(), every_token.norm(dim=0))
    assert norms.tokens == 2 * 6 + 3 * 4
