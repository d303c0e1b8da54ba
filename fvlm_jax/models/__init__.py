"""Flax NNX encoders of fVLM: 3D ViT, BERT-style text encoder, anatomy pooling."""
