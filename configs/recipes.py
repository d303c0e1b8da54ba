"""The two recipes (config key `recipe`): "project" keeps every switch at its value in the config, "reference" sets
each switch below to what the public fVLM code (alibaba-damo-academy/fvlm d768ec1) does, unless the command line
gives that key. Resolved once, after the flags are parsed (run.py), so `--config.recipe=reference` works with every
config file and variant. docs/method.md, "Two recipes", tables each point with the reason the project deviates.
"""

from __future__ import annotations

from collections.abc import Iterable

import ml_collections

from input_pipeline.totalseg_classes import CLASS_TABLES

RECIPES = ("project", "reference")

# key -> the public code's value (file:line of alibaba-damo-academy/fvlm where it is decided)
REFERENCE = {
    "prep.normal_from_impression": True,  # caption_datasets.py:118, blip_pretrain.py:249
    "prep.template_texts": True,  # caption_datasets.py:63-91, blip_pretrain.py:203-206
    "loss.normal_pairs": True,  # blip_pretrain.py:252
    "loss.same_text_pairs": True,  # blip_pretrain.py:255
    "loss.disease_pairs": False,  # only identical texts are paired (the paper's disease-aware pairing is not there)
    "loss.skip_all_positive": True,  # blip_pretrain.py:267
    "model.dropout": 0.1,  # blip_pretrain.py:109 (pooling attention), :338 (MONAI ViT dropout_rate)
    "model.gelu": "erf",  # MONAI MLPBlock's nn.GELU, BERT's "gelu"
    "model.temperature.mode": "clamp",  # blip_pretrain.py:174, temp.clamp_(0.001, 0.5) under no_grad
    "train.grad_clip_norm": 0.0,  # the LAVIS runner does not clip
    "model.dtype": "float32",  # pretrain_ct.yaml: amp False
    "eval.protocol": "public",  # eval.py:92-118, 143-160, 266: a window per anatomy, its prompts (docs/evaluation.md)
}
# The public code's heart mask also holds TotalSegmentator's left atrial appendage (class 61 of the v2 "total" table).
REFERENCE_HEART_EXTRA = "atrial_appendage_left"


def _get(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _set(cfg, key, value):
    *path, last = key.split(".")
    for part in path:
        cfg = cfg[part]
    cfg[last] = value


def resolve(cfg: ml_collections.ConfigDict, explicit: Iterable[str] = ()) -> dict:
    """Applies cfg.recipe to cfg in place and returns {key: value} of every switch as resolved.

    explicit: the config keys given on the command line ("train.grad_clip_norm", as
    `config_flags.get_override_values` lists them): those keep their value under either recipe. Under "project"
    nothing changes. Under "reference" every key of REFERENCE takes its value there, and the "heart" anatomy gains
    REFERENCE_HEART_EXTRA when the class table has it (unless prep.anatomies is explicit).
    """
    if cfg.recipe not in RECIPES:
        raise ValueError(f"recipe={cfg.recipe!r}: choose one of {RECIPES}")
    explicit = set(explicit)
    if cfg.recipe == "reference":
        for key, value in REFERENCE.items():
            if key not in explicit:
                _set(cfg, key, value)
        heart = list(cfg.prep.anatomies.get("heart", ()))
        if (heart and "prep.anatomies" not in explicit and REFERENCE_HEART_EXTRA not in heart
                and REFERENCE_HEART_EXTRA in CLASS_TABLES[cfg.prep.class_table].values()):
            cfg.prep.anatomies = {**cfg.prep.anatomies, "heart": [*heart, REFERENCE_HEART_EXTRA]}
    resolved = {key: _get(cfg, key) for key in REFERENCE}
    resolved["prep.anatomies.heart"] = list(cfg.prep.anatomies.get("heart", ()))
    return resolved


def describe(recipe: str, resolved: dict, explicit: Iterable[str] = ()) -> str:
    """One log line of `resolve`'s result (run.py logs it once the config is valid, so an invalid config still
    ends in its one error line)."""
    explicit = set(explicit)
    return f"recipe {recipe}: " + ", ".join(
        f"{k}={v!r}" + (" (command line)" if k in explicit else "") for k, v in resolved.items())
