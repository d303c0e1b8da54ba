"""fVLM at the paper's size on CT-RATE (public chest CT): ViT-B 3D on 112 x 256 x 352, 4 anatomies, 16 tasks.

python run.py --config=configs/ct_rate.py --workdir=/data/fvlm_ct_rate \\
    --config.data.root=/data/CT-RATE --config.data.segmentation_root=/data/CT-RATE/totalseg
"""

import ml_collections

from configs import demo

# --config.recipe=reference adds TotalSegmentator's atrial_appendage_left to the heart, as the public code's heart
# mask has it (configs/recipes.py).
ANATOMIES = {
    "lung": demo.ANATOMIES["lung"],
    "heart": ["heart"],
    "esophagus": ["esophagus"],
    "aorta": ["aorta"],
}

# CT-RATE's 18 labels and the anatomy each is scored on. The reference protocol scores 16 (eval.tasks below); Medical
# material (tubes, lines, devices) and Lymphadenopathy (mediastinal and hilar nodes) lie in none of the four
# anatomies, so they have none (None) and are not scored.
LABEL_ANATOMY = {
    "Medical material": None, "Arterial wall calcification": "aorta", "Cardiomegaly": "heart",
    "Pericardial effusion": "heart", "Coronary artery wall calcification": "heart", "Hiatal hernia": "esophagus",
    "Lymphadenopathy": None, "Emphysema": "lung", "Atelectasis": "lung", "Lung nodule": "lung",
    "Lung opacity": "lung", "Pulmonary fibrotic sequela": "lung", "Pleural effusion": "lung",
    "Mosaic attenuation pattern": "lung", "Peribronchial thickening": "lung", "Consolidation": "lung",
    "Bronchiectasis": "lung", "Interlobular septal thickening": "lung",
}
_SCORED = [label for label, anatomy in LABEL_ANATOMY.items() if anatomy]
_ORDER = ["lung", "heart", "esophagus", "aorta"]
_SCORED.sort(key=lambda label: _ORDER.index(LABEL_ANATOMY[label]))
# The reference protocol's 16 scored labels with its prompts, "Not X." / "X." (the public eval.py).
TASKS = [(LABEL_ANATOMY[d], d, f"Not {d}.", f"{d}.") for d in _SCORED]
# The public protocol's prompts (eval.protocol="public"): eval.py's own pairs at commit d768ec1, which differ from
# "Not X." / "X." for 4 labels (eval.py:143-160).
PUBLIC_PROMPTS = {"Atelectasis": ("Not Atelectatic.", "Atelectatic."), "Lung nodule": ("Not Nodule.", "Nodule."),
                  "Lung opacity": ("Not Opacity.", "Opacity."),
                  "Pulmonary fibrotic sequela": ("Not Pulmonary fibrotic.", "Pulmonary fibrotic.")}
PUBLIC_TASKS = [(a, d, *PUBLIC_PROMPTS.get(d, (neg, pos))) for a, d, neg, pos in TASKS]
# Two more phrasings per label, averaged with the reference pair (fvlm_jax.evaluate.mean_prompts). Written down
# without CT-RATE scores (none were run here): nothing was chosen on a split. eval/<method>.json reports each pair's
# AUC on data.threshold_split; --config.eval.prompt_variants="()" scores the reference pair alone.
PROMPT_VARIANTS = ([(LABEL_ANATOMY[d], d, f"No {d.lower()}.", f"{d}.") for d in _SCORED]
                   + [(LABEL_ANATOMY[d], d, f"There is no {d.lower()}.", f"{d} is present.") for d in _SCORED])


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = demo.get_config()
    c.data.source = "ct_rate"
    # The CT-RATE download: the folder holding dataset/ (volumes, *_fixed volumes, and the tables inside it or beside
    # it; docs/data.md, "CT-RATE layout").
    c.data.root = ""
    c.data.segmentation_root = ""  # TotalSegmentator outputs as <root>/<split>/<volume>.nii.gz (or its folder)
    c.data.train_split = "train"
    # CT-RATE publishes no third split: thresholds come from the reported split, as in CT-CLIP (AUC is unaffected).
    c.data.threshold_split = "valid"
    c.data.eval_split = "valid"
    c.data.num_shards = 1024  # ~46 volumes (~1 GiB of raw uint8 records) per file
    c.data.workers = 16
    # ~17 MiB per raw volume (uint8 image + 4-bit labels) at this size, ~6 MiB with zlib (the buffer keeps zlib
    # records compressed): the buffer holds ~2 GiB (~0.8 GiB with zlib); a resume reads
    # and decodes at most one block of 8 files (~6 GiB) to reach its step.
    c.data.shuffle_buffer = 128
    c.data.block_files = 8
    c.data.reconstructions = "one_per_epoch"  # the reference: one sample = one scan with a random reconstruction
    # Record files read at once. One reader thread bounds the stream at its speed (about 70 volumes/s on a 2-core
    # host), while one GPU trains about 300 volumes/s at the paper's size (docs/benchmarks.md). 4 cost about
    # 0.75 GiB more host memory (bench/input_stream.py --threads 2 --pipelines ours_none,ours_none_parallel_reads).
    c.data.parallel_reads = 4

    c.prep.anatomies = ANATOMIES
    c.prep.spacing_xyz = (1.0, 1.0, 3.0)
    c.prep.hu_window = (-1150.0, 350.0)
    c.prep.margin_zyx = (5, 20, 20)
    c.prep.min_size_zyx = (112, 256, 352)
    c.prep.vocab_size = 8000
    c.prep.text_len = 128
    c.prep.report_len = 512

    c.model.input_zyx = (112, 256, 352)
    c.model.embed_dim = 256
    c.model.pool_heads = 4
    c.model.vision.update(
        patch_zyx=(16, 16, 32), width=768, depth=12, heads=12, mlp_dim=3072, feature_blocks=(4, 7, 10),
        stem_channels=())
    c.model.text.update(
        max_len=512, width=768, depth=12, heads=12, mlp_dim=3072,
        # Tokens per anatomy text: each anatomy's 99th percentile in records/stats.json, rounded up to a multiple
        # of 8, at most prep.text_len ("" = all at prep.text_len; or explicit, "lung=120,heart=64").
        anatomy_len="p99")
    # The paper's initialisation (docs/training.md, "Pretrained encoders"), from local copies of the public
    # checkpoints; both are empty here (random initialisation) because nothing is downloaded:
    # - image encoder: MAE's ImageNet ViT-B, mae_pretrain_vit_base.pth (facebookresearch/mae's release,
    #   https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth):
    #   --config.model.vision.init=/models/mae_pretrain_vit_base.pth
    #   The 3D patch embedding starts fresh (model.vision.init_patch): the 16 x 16 x 32 patch has no 2D counterpart.
    # - text encoder: CXR-BERT, microsoft/BiomedVLP-CXR-BERT-specialized (a Hugging Face folder; e.g.
    #   `huggingface-cli download microsoft/BiomedVLP-CXR-BERT-specialized --local-dir /models/cxr-bert`):
    #   --config.model.text.init=/models/cxr-bert
    #   It sets the text encoder's sizes (BERT-base: the values above) and the WordPiece tokenizer of the records:
    #   prepare with it set.

    c.model.dtype = "bfloat16"
    # No rematerialisation: on one H200 (bf16, cuDNN attention) 14 volumes per device need 12.7 GiB without it, and
    # remat (nothing_saveable) made the step 2.2x slower (57.9 -> 126.6 ms, both with the batch copied in the loop;
    # docs/benchmarks.md). Where the attention is XLA's (TPU), the [B, H, N, N] logits are kept: XLA:CPU's
    # memory analysis estimates 34.6 GiB without remat and 28.8 GiB with it at 14 volumes per device (GELU
    # recomputed); with less memory than that, set model.remat=True and train.grad_accum_steps=2 (17.3 GiB).
    c.model.remat = False

    c.train.batch_size = 56
    # The reference's 20 epochs x 377 steps; an epoch is one random reconstruction of each scan (data.reconstructions).
    c.train.steps = 7540
    c.train.learning_rate = 1e-4
    c.train.init_learning_rate = 1e-6
    c.train.end_learning_rate = 1e-6
    c.train.warmup_steps = 377
    c.loss.coteach_start_step = c.loss.coteach_ramp_steps = 377  # co-teaching mixes after the warm-up
    c.train.weight_decay = 0.01
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3

    c.eval.tasks = TASKS
    c.eval.prompt_variants = PROMPT_VARIANTS
    c.eval.batch_size = 16
    # CT-RATE has no split apart from the reported one (data.eval_split = data.threshold_split = "valid"): choosing a
    # checkpoint there would tune on the reported numbers, so the last one is scored ("all" is allowed, and the
    # report then says the step was chosen on the reported split).
    c.eval.checkpoints = "latest"
    c.eval.count = "scan"  # one reconstruction per scan; "reconstruction" counts every record (fVLM's issue #12)
    c.eval.public_crop_zyx = (112, 288, 352)  # eval.py:266 roi_size
    c.eval.public_tasks = PUBLIC_TASKS  # used by eval.protocol="public" only
    if arg == "runlocal":  # the same code path at a size that runs on a laptop
        # A coarse grid so the whole chest fits the small crop and anatomies stay intact (else nothing trains).
        c.prep.spacing_xyz = (6.0, 6.0, 12.0)
        c.prep.margin_zyx = (1, 2, 2)
        c.model.input_zyx = (32, 64, 64)
        c.prep.min_size_zyx = (32, 64, 64)
        c.eval.public_crop_zyx = (32, 96, 64)  # the input with y 2 patches longer, as eval.py's crop
        c.model.vision.update(patch_zyx=(8, 16, 16), width=64, depth=2, heads=4, mlp_dim=128, feature_blocks=(1,))
        c.model.text.update(width=64, depth=2, heads=4, mlp_dim=128)
        c.train.batch_size, c.train.steps = 4, 10
        c.model.dtype, c.model.remat = "float32", False
    return c
