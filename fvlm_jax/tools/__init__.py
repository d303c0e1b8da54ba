"""Command-line tools beside run.py (python -m fvlm_jax.tools.<name>)."""
