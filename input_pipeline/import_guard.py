"""Importing a library without an optional dependency it would load for nothing.

TensorFlow imports Keras, and tensorboardX imports PyTorch, whenever they are installed; neither is used here, and
each costs about 2 CPU-s per process (`input_pipeline.tf_modules`, `fvlm_jax.train_log`). Both libraries catch
the ImportError of the optional import."""

import contextlib
import sys


@contextlib.contextmanager
def unimportable(name: str):
    """Inside the block, `import name` raises ImportError, unless `name` is loaded already; afterwards the mark is
    removed, so a later import of `name` works as usual."""
    block = name not in sys.modules
    if block:
        sys.modules[name] = None
    try:
        yield
    finally:
        if block and sys.modules.get(name, 0) is None:
            del sys.modules[name]
