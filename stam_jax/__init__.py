"""stam-jax: STAM (Sharir et al., 2021) video classification in JAX/Flax."""

from stam_jax.model import STAM
from stam_jax.variants import VARIANTS, create_model, model_config, model_from_config

__all__ = ["STAM", "VARIANTS", "create_model", "model_config", "model_from_config"]
__version__ = "0.1.0"
