"""Adversarial fine-tuning: train memorized images away against the triggers Dori finds (docs/methods.md §8).

Kowalczuk et al. (2025) answer the non-locality of memorization with training
rather than pruning. Each round of `AdversarialFineTuning.fit`:

1. Triggers: for every selected image, a `DoriSearch` on the current UNet from
   `triggers_per_image` starts: the image's own caption and Gaussian starts
   with new seeds each round. Triggers of all rounds so far stay in the pool.
2. Training: `steps_per_round` optimiser steps on
       L = L_normal(normal pairs) + ‖ε − unet(√ᾱ_t x̃ + √(1−ᾱ_t) ε, t, y_adv)‖²
   with y_adv drawn from the pool and x̃ one of the image's surrogate images.
3. Evaluation: replication of each selected image under its caption and under
   a fresh Dori attack (starts, search noise and generation seeds never used
   in training).
4. A checkpoint; `fit` on the same `out_dir` resumes after the last finished round.

Normal pairs (`analysis.normal`): the non-selected memorized images with their
captions (so they stay memorized, the control that the mitigation is targeted)
and ordinary pairs: the model's `--normal` set, else its own generations for its
training captions (COCO captions for SD), or any source passed to `fit` (the
experiments pass the demo model's procedural shapes).

The normal term (`utility_loss`): "denoising" is the paper's L_DM toward the
noise; "distillation" trains toward the unmodified UNet's prediction for the
same noisy image and caption, holding ordinary prompts to what they generated
before. By default latent (SD) models distil: their normal pairs are usually
their own generations, for which the teacher's prediction is the ground truth,
and on the bundled model distillation unlearned as much with less drift
(docs/results/robust_mitigation.md). Pixel-space models keep the paper's term.

Surrogate x̃: by default what a mitigated model generates for the caption.
Pruning masks found by NeMo or Wanda do not stop replication on the bundled
model (docs/results/mitigation.md), so the default mitigation blocks one whole
cross-attention value layer: every NeMo layer is tried, and of those that stop
replication on every seed the one whose generations are least similar to the
training image is used; when none does, every cross-attention value layer is
blocked. If even that replicates, `fit` raises ValueError instead of training
toward the memorized image; pass a `Mask` or an image as `surrogate` then.
`adversarial_batch=0` is the control: the normal term alone.

Noise: drawn with the model's training offset (`handle.training_offset_noise`,
0.1 for the bundled model), so that the normal term keeps the model's own
training distribution.

Defaults: the whole UNet trains (the paper fine-tunes the full UNet; LoRA did
not work there) with Adam at lr 1e-4, 60 steps of 16 normal + 16 trigger rows
per round, 6 rounds, 4 triggers per image, the paper's Dori settings; the
optimiser and learning rate are open in the paper. What each setting did on the
bundled model, and its cost, is in docs/results/robust_mitigation.md.

Modules: `estimator` (`AdversarialFineTuning` and its rounds), `training` (the
loss and the trainable parameters), `surrogate`, `evaluation` (the attack and
side effects), `saving` (checkpoints and the tuned model's folder).
"""

from analysis.finetune.estimator import AdversarialFineTuning, FineTuneProgress, FineTuneRound, resolve_targets
from analysis.finetune.evaluation import EVALUATION_SEED_OFFSET, SIDE_EFFECT_PROMPTS, attack, json_ready, side_effects
from analysis.finetune.saving import CHECKPOINT_FILE, save_model_folder
from analysis.finetune.surrogate import mitigated_surrogate
from analysis.finetune.training import denoising_loss, trainable_parameters

__all__ = [
    "CHECKPOINT_FILE", "EVALUATION_SEED_OFFSET", "SIDE_EFFECT_PROMPTS", "AdversarialFineTuning", "FineTuneProgress",
    "FineTuneRound", "attack", "denoising_loss", "json_ready", "mitigated_surrogate", "resolve_targets",
    "save_model_folder", "side_effects", "trainable_parameters",
]
