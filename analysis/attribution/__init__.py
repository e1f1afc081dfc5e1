"""Token attribution of the memorization score: which words of a prompt drive replication?

One algorithm a file, one call signature: `Method(hyperparameters).attribute(handle, prompt) -> TokenAttribution`.

* `GradientNorm` (gradient.py): Wen et al.'s ‖∂m/∂y_i‖₂ per token.
* `IntegratedGradients` (integrated_gradients.py): captum's IG over the token embeddings (the text
  encoder's input), from the empty prompt's tokens.
* `Occlusion` (occlusion.py): the drop of m when one word is removed from the prompt; no gradient, so it is the
  ground truth of how much the score depends on each word.
"""

from analysis.attribution.common import TokenAttribution, memorization_objective, prompt_tokens
from analysis.attribution.gradient import GradientNorm
from analysis.attribution.integrated_gradients import IntegratedGradients
from analysis.attribution.occlusion import Occlusion

__all__ = [
    "GradientNorm", "IntegratedGradients", "Occlusion", "TokenAttribution", "memorization_objective", "prompt_tokens",
]
