"""fvlm-jax: anatomy-level CT vision-language pre-training (fVLM) in JAX/Flax NNX.

Modules: `losses` (the contrastive objectives), `anatomy` (token membership and intact filter), `models`
(3D ViT, text encoder, anatomy pooling), `train`, `evaluate`, `export` (the `Predictor` for new scans).
"""

__version__ = "0.1.0"
