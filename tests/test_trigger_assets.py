import torch

from analysis.experiments.trigger_assets import shipped_trigger_sets
from analysis.model import load_model
from analysis.triggers import TriggerSet, shipped_set_folder


def test_every_memorized_image_of_the_bundled_model_has_a_shipped_trigger_set():
    handle = load_model()
    shipped = shipped_trigger_sets()
    for index, image in enumerate(handle.memorized):
        trigger_set = TriggerSet.load(shipped_set_folder(index))
        assert trigger_set.complete and trigger_set.config["caption"] == image.caption
        assert torch.equal(trigger_set.target, image.image.float())
        assert trigger_set.embeddings.shape == (len(trigger_set.triggers), 77, handle.unet.config.cross_attention_dim)
        assert all(t["replication_rate"] is not None for t in trigger_set.triggers)
        assert shipped[image.caption].config == trigger_set.config
