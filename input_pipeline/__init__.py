"""Data preparation and input pipelines.

Only `records` and `tfdata` use TensorFlow (imported in `tf_modules`); preprocessing, report splitting and
tokenisation do not, so the exported model can embed new scans on hosts without TensorFlow.
"""

import os

# TensorFlow here only moves uint8 volumes and int token ids: its oneDNN float kernels are irrelevant, and
# disabling them (with the C++ INFO logs) keeps the start-up banner out of every worker's output.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
