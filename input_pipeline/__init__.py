"""Data preparation and input pipelines.

Only `records` and `tfdata` import TensorFlow; preprocessing, report splitting and tokenisation do not, so the
exported model can embed new scans on hosts without TensorFlow.
"""
