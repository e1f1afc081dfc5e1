import torch

from analysis.hooks import hook_points
from analysis.localize import wanda
from analysis.localize.wanda import Wanda, top_share_per_row, wanda_scores
from analysis.sampling import sample

PROMPT = "a photo of the red lighthouse"


def test_prunes_weights_important_for_the_prompt_only():
    weight = torch.tensor([[1.0, 1.0, 1.0, 1.0],
                           [10.0, 1.0, 1.0, -1.0]])
    prompt_norms = torch.tensor([1.0, 1.0, 1.0, 8.0])
    reference_norms = torch.tensor([1.0, 1.0, 8.0, 1.0])
    # Top 25 % = one weight per row. Row 0: the prompt's top is column 3, the references' column 2: prune (0, 3).
    # Row 1: |10|·1 beats |-1|·8 for both sets: nothing pruned.
    for_prompt = top_share_per_row(wanda_scores(weight, prompt_norms), 0.25)
    for_references = top_share_per_row(wanda_scores(weight, reference_norms), 0.25)
    assert torch.equal(for_prompt & ~for_references, torch.tensor([[0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool))
    assert top_share_per_row(wanda_scores(weight, prompt_norms), 0.5).sum(dim=1).tolist() == [2, 2]


def test_fit_contrasts_prompt_and_reference_activations(tiny_handle, monkeypatch, tmp_path):
    # The prompt drives input channel 0 of every layer, the references channel 1: exactly column 0 is pruned.
    def fake_norms(handle, layers, prompts, *args):  # noqa: ARG001 - input_norms' signature
        channel = 0 if prompts == [PROMPT] else 1
        norms = {}
        for name, layer in layers.items():
            norms[name] = torch.full((layer.in_features,), 1e-6)
            norms[name][channel] = 1e6
        return norms

    monkeypatch.setattr(wanda, "input_norms", fake_norms)
    mask = Wanda(sparsity=0.01, cache_dir=tmp_path).fit(tiny_handle, PROMPT).mask_
    assert list(mask.removed) == list(hook_points(tiny_handle.unet, "ff"))
    for name, removed in mask.removed.items():
        assert removed[:, 0].all() and not removed[:, 1:].any(), name


def test_fit_on_real_activations_prunes_a_few_weights_per_row(tiny_handle, tmp_path):
    model = Wanda(sparsity=0.05, record_steps=2, steps=4, cache_dir=tmp_path)
    mask = model.fit(tiny_handle, PROMPT, seeds=[0, 1]).mask_
    layers = hook_points(tiny_handle.unet, "ff")
    for name, removed in mask.removed.items():
        assert removed.shape == layers[name].weight.shape
        assert removed.sum(dim=1).max() <= max(1, round(0.05 * removed.shape[1]))
    assert sum(mask.counts().values()) > 0
    assert len(list(tmp_path.glob("wanda-norms-*.safetensors"))) == 1
    before = sample(tiny_handle, [PROMPT], seeds=[0], steps=4).images
    with mask.applied(tiny_handle):
        after = sample(tiny_handle, [PROMPT], seeds=[0], steps=4).images
    assert not torch.equal(before, after)
