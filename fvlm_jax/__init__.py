"""fvlm-jax: anatomy-level CT vision-language pre-training (fVLM) in JAX/Flax NNX.

Where to look: `losses` (the contrastive objectives), `anatomy` (token membership and intact filter), `models`
(3D ViT, text encoder, anatomy pooling), `train_step` (the jitted step), `train` (the loop), `evaluate`, `export`
(the `Predictor` for new scans), `stages` (what `run.py --mode` runs). docs/architecture.md draws the layers.
"""

__version__ = "0.1.0"
