"""Early, readable errors for bad config values (before minutes of preparation or compilation are spent), and which
errors run.py reports as one line instead of a traceback."""

from __future__ import annotations

import os

import jax
import ml_collections

from fvlm_jax import pretrained, sharding, text_lengths
from fvlm_jax.models.fvlm import METHODS
from fvlm_jax.models.transformer import ATTENTION_IMPLS, GELUS
from input_pipeline import report_split

MODES = ("prepare", "train", "eval", "export", "all", "predict")
# Where this project's code lives: an error raised here with a message is the user's to fix (see user_error).
_PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OURS = tuple(os.path.join(_PROJECT, d) + os.sep for d in ("fvlm_jax", "input_pipeline", "configs")) + (
    os.path.join(_PROJECT, "run.py"),)


def user_error(exc: BaseException) -> str | None:
    """The message to show instead of a traceback, or None for an error that looks like a bug.

    A user error is a ValueError, OSError (FileNotFoundError, ...) or RuntimeError that this project's code raised
    itself (the innermost frame of its traceback is in fvlm_jax/, input_pipeline/, configs/ or run.py): a bad config
    value, a missing or unusable input, data.strict's rejects. Anything else (an IndexError, an error raised inside
    JAX or NumPy) keeps its traceback.
    """
    if not isinstance(exc, (ValueError, OSError, RuntimeError)) or not str(exc):
        return None
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or not os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_OURS):
        return None
    return str(exc)


def validate(cfg: ml_collections.ConfigDict) -> None:
    errors = []
    m, v = cfg.model, cfg.model.vision
    if len(m.input_zyx) != 3 or len(v.patch_zyx) != 3:
        errors.append("model.input_zyx and model.vision.patch_zyx need 3 values (z, y, x)")
    elif any(i % p for i, p in zip(m.input_zyx, v.patch_zyx)):
        errors.append(f"model.input_zyx {tuple(m.input_zyx)} must be divisible by model.vision.patch_zyx "
                      f"{tuple(v.patch_zyx)}")
    for name, enc in (("vision", v), ("text", m.text)):
        if enc.width % enc.heads:
            errors.append(f"model.{name}.width={enc.width} must be divisible by model.{name}.heads={enc.heads}")
    if v.width % m.pool_heads:
        errors.append(f"model.vision.width={v.width} must be divisible by model.pool_heads={m.pool_heads}")
    if any(not 1 <= b <= v.depth for b in v.feature_blocks):
        errors.append(f"model.vision.feature_blocks {tuple(v.feature_blocks)} must lie in [1, {v.depth}]")
    if max(cfg.prep.text_len, cfg.prep.report_len) > m.text.max_len:
        errors.append(f"prep.text_len / prep.report_len exceed model.text.max_len={m.text.max_len}")
    spec = str(m.text.anatomy_len or "")
    if spec and not text_lengths.is_percentile(spec):
        try:
            text_lengths.parse(spec, cfg.prep.anatomies, cfg.prep.text_len)
        except ValueError as e:
            errors.append(str(e))
    if not 0 < m.temperature.min <= m.temperature.init <= m.temperature.max:
        errors.append("need 0 < model.temperature.min <= init <= max")
    if m.temperature.mode not in ("clip", "clamp"):
        errors.append(f"model.temperature.mode={m.temperature.mode!r}: choose 'clip' or 'clamp'")
    if m.gelu not in GELUS:
        errors.append(f"model.gelu={m.gelu!r}: choose one of {GELUS}")
    if not 0 <= m.dropout < 1:
        errors.append(f"model.dropout={m.dropout}: a rate in [0, 1)")
    bad = [x for x in cfg.train.methods if x not in METHODS]
    if bad:
        errors.append(f"train.methods: unknown {bad}; choose from {METHODS}")
    if cfg.train.steps < 1 or cfg.train.batch_size < 2:
        errors.append("train.steps must be >= 1 and train.batch_size >= 2 (a contrastive batch)")
    for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
        if cfg.train[name] < 1:
            errors.append(f"train.{name} must be >= 1")
    if cfg.data.num_shards < 1 or cfg.eval.batch_size < 1 or cfg.data.workers < 1:
        errors.append("data.num_shards, data.workers and eval.batch_size must be >= 1")
    if cfg.prep.vocab_size > m.text.vocab_size:
        errors.append(f"prep.vocab_size={cfg.prep.vocab_size} exceeds model.text.vocab_size={m.text.vocab_size}")
    if cfg.train.warmup_steps < 0 or cfg.train.learning_rate <= 0:
        errors.append("train.warmup_steps must be >= 0 and train.learning_rate > 0")
    if not 0 <= cfg.train.flip_prob <= 1:
        errors.append("train.flip_prob must be in [0, 1]")
    anatomies = list(cfg.prep.anatomies)
    for task in cfg.eval.tasks:
        if len(task) != 4 or task[0] not in anatomies:
            errors.append(f"eval.tasks entry {task!r}: need (anatomy in prep.anatomies, label, negative, positive)")
    keys = {(t[0], t[1]) for t in cfg.eval.tasks if len(t) == 4}
    for pair in cfg.eval.prompt_variants:
        if len(pair) != 4 or (pair[0], pair[1]) not in keys:
            errors.append(f"eval.prompt_variants entry {pair!r}: need (anatomy, label) of an eval.tasks entry, "
                          "negative, positive")
    if cfg.eval.count not in ("scan", "reconstruction"):
        errors.append(f"eval.count={cfg.eval.count!r}: choose 'scan' or 'reconstruction'")
    if cfg.eval.protocol not in ("project", "public"):
        errors.append(f"eval.protocol={cfg.eval.protocol!r}: choose 'project' or 'public'")
    if len(cfg.eval.public_crop_zyx) != 3 or any(t[0] not in anatomies or len(t) != 4 for t in cfg.eval.public_tasks):
        errors.append("eval.public_crop_zyx needs 3 values (z, y, x); eval.public_tasks entries (anatomy in "
                      "prep.anatomies, label, negative, positive)")
    if str(cfg.eval.checkpoints).strip() not in ("latest", "all") and not all(
            s.isdigit() for s in str(cfg.eval.checkpoints).replace(",", " ").split()):
        errors.append(f"eval.checkpoints={cfg.eval.checkpoints!r}: 'latest', 'all' or steps such as '200,400'")
    if cfg.eval.bootstrap_draws < 1:
        errors.append("eval.bootstrap_draws must be >= 1")
    errors += report_split.vocabulary_errors(cfg.prep, cfg.data.decomposition_dir)
    if cfg.data.reconstructions not in ("all", "one_per_epoch"):
        errors.append(f"data.reconstructions={cfg.data.reconstructions!r}: choose 'all' or 'one_per_epoch'")
    if (reads := cfg.data.parallel_reads) != -1 and reads < 1:
        errors.append(f"data.parallel_reads={reads}: a count >= 1, or -1 for tf.data's AUTOTUNE")
    if cfg.data.block_files < 1 or cfg.data.shuffle_buffer < 1:
        errors.append("data.block_files and data.shuffle_buffer must be >= 1")
    if cfg.data.runner not in ("local", "beam"):
        errors.append(f"data.runner={cfg.data.runner!r}: choose 'local' or 'beam'")
    if cfg.prep.volume_encoding not in ("none", "zlib"):
        errors.append(f"prep.volume_encoding={cfg.prep.volume_encoding!r}: choose 'none' or 'zlib'")
    if cfg.prep.hu_window[0] >= cfg.prep.hu_window[1]:
        errors.append(f"prep.hu_window {tuple(cfg.prep.hu_window)} must be (low, high) with low < high")
    if any(s <= 0 for s in cfg.prep.spacing_xyz):
        errors.append("prep.spacing_xyz must be positive")
    if cfg.data.source not in ("demo", "ct_rate", "manifest"):
        errors.append(f"data.source={cfg.data.source!r}: choose 'demo', 'ct_rate' or 'manifest'")
    if cfg.data.source == "ct_rate" and not cfg.data.root:
        errors.append("data.source='ct_rate' needs data.root (the folder holding dataset/, radiology_text_reports/...)")
    if cfg.data.source == "manifest" and not str(cfg.data.root).endswith(".jsonl"):
        errors.append("data.source='manifest' needs data.root = the path of a .jsonl manifest")
    if cfg.model.remat_policy not in dir(jax.checkpoint_policies):
        errors.append(f"model.remat_policy={cfg.model.remat_policy!r} is not a jax.checkpoint_policies name")
    if cfg.model.attention not in ATTENTION_IMPLS:
        errors.append(f"model.attention={cfg.model.attention!r}: choose one of {ATTENTION_IMPLS}")
    if cfg.loss.impl not in ("gspmd", "shard_map"):
        errors.append(f"loss.impl={cfg.loss.impl!r}: choose 'gspmd' or 'shard_map'")
    accum = cfg.train.grad_accum_steps
    if accum < 1 or cfg.train.batch_size % accum:
        errors.append(f"train.grad_accum_steps={accum} must be >= 1 and divide train.batch_size={cfg.train.batch_size}")
    if cfg.mesh.fsdp < 1 or cfg.mesh.tensor < 1 or cfg.mesh.data == 0 or cfg.mesh.data < -1:
        errors.append("mesh.fsdp and mesh.tensor must be >= 1, mesh.data >= 1 or -1 (all remaining devices)")
    try:
        sharding.rules_dict(cfg.sharding.rules)
    except (ValueError, TypeError) as e:
        errors.append(f"sharding.rules: {e}")
    errors += pretrained.config_errors(cfg)
    if errors:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(errors))
