"""TensorFlow and tensorflow-datasets for the input pipeline, with TensorFlow imported without Keras.

`import tensorflow` eagerly imports Keras' optimizers whenever Keras is installed (TensorFlow's pip package
requires it), only to register them for SavedModels; the pipeline never touches Keras. That import costs about
2.3 CPU-s in every process that reads records (measured: `import tensorflow` plus a tf.data map, 6.9 CPU-s with
Keras, 4.6 without). While TensorFlow loads, Keras is marked unimportable, unless it is loaded already; TensorFlow
expects the ImportError, and the mark is removed afterwards, so `tf.keras` and `import keras` work as usual later.
Modules of this package import `tf` and `tfds` from here."""

from input_pipeline.import_guard import unimportable

with unimportable("keras"):  # TensorFlow's __init__ catches the ImportError
    import tensorflow as tf

import tensorflow_datasets as tfds

__all__ = ["tf", "tfds"]
