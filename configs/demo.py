"""Tiny fVLM on the embedded synthetic demo data set: the whole pipeline in minutes on a 2-core CPU.

python run.py --config=configs/demo.py --workdir=/tmp/fvlm_demo
"""

import ml_collections

from fvlm_jax import sharding
from input_pipeline import report_split

ANATOMIES = {
    "lung": ["lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
             "lung_lower_lobe_right"],
    "heart": ["heart"],
    "esophagus": ["esophagus"],
    "aorta": ["aorta"],
    "liver": ["liver"],
    "spleen": ["spleen"],
    "kidney": ["kidney_left", "kidney_right"],
}

# (anatomy, label column, negative prompt, positive prompt). The demo's prompts use its reports' own words (a
# negated sentence and a finding or impression phrase of the generator); where several phrasings exist, the pair was
# chosen on the valid split, never on the reported test split. Both methods get the same prompts.
TASKS = [
    ("lung", "Lung nodule", "No pulmonary nodules are seen.", "Pulmonary nodules, follow-up advised."),
    ("lung", "Emphysema", "There are no emphysematous changes in the lungs.",
     "Extensive emphysematous changes with bullae."),
    ("lung", "Pleural effusion", "There is no pleural effusion or pneumothorax.",
     "Pleural fluid is seen layering dependently."),
    ("lung", "Consolidation", "No consolidation in either lung.", "Consolidation, likely pneumonia."),
    ("heart", "Cardiomegaly", "No cardiomegaly.", "Cardiomegaly."),
    ("heart", "Pericardial effusion", "No pericardial effusion.", "Pericardial effusion."),
    ("heart", "Coronary artery wall calcification", "No coronary artery calcification is seen.",
     "Coronary artery calcification."),
    ("esophagus", "Hiatal hernia", "No hiatal hernia.", "Hiatal hernia."),
    ("aorta", "Arterial wall calcification", "No aortic wall calcification.", "Aortic atherosclerotic calcification."),
    ("liver", "Liver lesion", "No focal liver lesion.", "Hypodense liver lesion."),
    ("liver", "Hepatic steatosis", "No hepatic steatosis.", "Hepatic steatosis."),
    ("spleen", "Splenomegaly", "No splenomegaly.", "Splenomegaly."),
    ("kidney", "Renal cyst", "No renal cyst.", "Renal cyst."),
]
# More prompt pairs per task (anatomy, label, negative, positive): each task's score averages over its pairs in
# TASKS and here (fvlm_jax.evaluate.mean_prompts). These are other sentences of the demo generator's own
# vocabulary, written down from input_pipeline/demo_data.py without looking at any split's scores (nothing was
# chosen on a split); eval/<method>.json reports each pair's valid-split AUC ("prompts").
PROMPT_VARIANTS = [
    ("lung", "Lung nodule", "There is no evidence of a lung nodule.", "Multiple solid pulmonary nodules are noted."),
    ("lung", "Emphysema", "No emphysema.", "Emphysema."),
    ("lung", "Pleural effusion", "No pleural effusion.", "Bilateral pleural effusions."),
    ("lung", "Consolidation", "There is no evidence of pulmonary consolidation.",
     "There is dense airspace consolidation, consistent with pneumonia."),
    ("heart", "Cardiomegaly", "Heart size is normal.", "The heart is enlarged."),
    ("heart", "Pericardial effusion", "There is no evidence of pericardial effusion.",
     "A small pericardial effusion is present."),
    ("heart", "Coronary artery wall calcification", "No coronary artery calcification is seen.",
     "Coronary artery calcifications are present."),
    ("esophagus", "Hiatal hernia", "The esophagus is unremarkable.", "A hiatal hernia is present."),
    ("aorta", "Arterial wall calcification", "The aorta is of normal calibre without wall calcification.",
     "Atherosclerotic calcifications of the thoracic aorta."),
    ("liver", "Liver lesion", "No focal liver lesion is seen.", "Multiple hypoattenuating hepatic lesions."),
    ("liver", "Hepatic steatosis", "Liver parenchyma is homogeneous.", "Fatty infiltration of the liver."),
    ("spleen", "Splenomegaly", "The spleen is normal in size.", "The spleen is enlarged."),
    ("kidney", "Renal cyst", "Both kidneys are unremarkable.", "Simple renal cortical cyst."),
]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # "project": this project's choices, every switch below at its written default. "reference": the public fVLM
    # code's semantics (alibaba-damo-academy/fvlm d768ec1); configs/recipes.py sets each switch it names to the
    # public value unless that key is given on the command line (docs/method.md, "Two recipes").
    c.recipe = "project"

    c.data = ml_collections.ConfigDict()
    c.data.source = "demo"  # "demo": generate the synthetic set under <workdir>/raw; "ct_rate": read data.root
    c.data.root = ""
    c.data.segmentation_root = ""
    c.data.num_train = 480
    c.data.num_valid = 96
    c.data.num_test = 192
    # Demo reports (data.source "demo"): true describes every normal anatomy by the one fixed sentence "<Anatomy>
    # shows no significant abnormalities.", as CT-RATE's texts are in the public code, so most anatomy texts of a
    # batch are identical (false negatives); images, labels and the other sentences do not change.
    c.data.demo_templates = False
    c.data.train_split = "train"
    c.data.threshold_split = "valid"  # per-task thresholds are chosen here, never on the reported split
    c.data.eval_split = "test"
    c.data.num_shards = 4
    c.data.strict = False  # true: any rejected input fails the preparation (after rejects.jsonl is written)
    c.data.use_metadata = True  # CT-RATE: geometry and HU from metadata/*.csv instead of the NIfTI header
    # Report decomposition made elsewhere (empty: built-in splitter): a folder with fVLM's desc_info.json /
    # conc_info.json, a RadGenome-ChestCT region CSV (.csv), a JSONL (.jsonl), or a folder of .csv / .jsonl files.
    c.data.decomposition_dir = ""
    c.data.workers = 2
    # "local": a process pool of data.workers on this machine. "beam": the image work as an Apache Beam pipeline
    # with the pipeline options in data.beam_options (docs/data.md, "Apache Beam"); on a dask.distributed cluster:
    # "--runner=DaskRunner --dask_client_address=HOST:8786".
    c.data.runner = "local"
    c.data.beam_options = "--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing"
    # Training order: each epoch takes the record files in a seeded random order, data.block_files at a time,
    # interleaved and shuffled through a buffer of data.shuffle_buffer records. A resumed run reads at most one
    # block to reach its step. Host memory holds about shuffle_buffer volumes (image + packed labels), decoded for
    # raw records and compressed for zlib ones (decoded after the buffer).
    c.data.shuffle_buffer = 512
    c.data.block_files = 8
    # "all": every record each epoch; "one_per_epoch": one reconstruction of each scan per epoch, drawn afresh each
    # epoch (scans are grouped by CT-RATE's volume names, train_1_a_1 and train_1_a_2 -> train_1_a).
    c.data.reconstructions = "all"
    # Record files of a block read at once (tf.data's deterministic parallel interleave; -1: AUTOTUNE). 1 reads
    # them one record after another in one thread; configs/ct_rate.py reads 4 (docs/benchmarks.md).
    c.data.parallel_reads = 1
    # Batches copied to the devices ahead of the training step (or evaluation batch) that uses them, in a background
    # thread (0: in the loop). At the paper's size on one H200, in one run of bench/feed_check.py, a step took 58.6 ms
    # with the copy in the loop, 52.4 ms with 2 batches ahead, 48.5 ms with 4, 47.5 ms on batches already there.
    c.data.prefetch_to_device = 2

    # Plain dicts stay dicts here (convert_dict=False): prep.anatomies keeps the order it is written in, which is the
    # anatomies' order in the records and the model (a ConfigDict would sort the names).
    c.prep = ml_collections.ConfigDict(convert_dict=False)
    c.prep.class_table = "total"  # TotalSegmentator "total" (v2) or "total_v1"
    c.prep.anatomies = ANATOMIES
    # The report splitter's words, per anatomy: {anatomy: {"words": [...], "diseases": {disease: [triggers]}}}
    # (input_pipeline/report_split.py). Every configured anatomy needs words, unless data.decomposition_dir gives
    # the texts. The default covers CT-RATE's and the demo's anatomies; anatomies not in prep.anatomies still take
    # part in the splitting. A YAML or JSON file of the same form in report_vocabulary_file replaces it.
    c.prep.report_vocabulary = report_split.chest_ct_vocabulary()
    c.prep.report_vocabulary_file = ""
    # Recipe switches of the anatomy texts (reference: both True; input_pipeline/captions.py). normal_from_impression:
    # an anatomy is normal when the report's impression says nothing about it (the public caption_datasets.py:118)
    # instead of when no disease trigger is found. template_texts: the text is impression + findings, an anatomy
    # without impression text starts with "<anatomy> shows no significant abnormalities." (stripped again before
    # tokenizing), and one the report does not describe gets that template alone and is a normal sample.
    c.prep.normal_from_impression = False
    c.prep.template_texts = False
    c.prep.spacing_xyz = (5.0, 5.0, 9.0)  # every anatomy fits the 32 x 48 x 64 input: none is cut by the crop
    # Wider than CT-RATE's [-1150, 350] so calcium (600-1000 HU) is not clipped to the same value as bone.
    c.prep.hu_window = (-1100.0, 900.0)
    c.prep.margin_zyx = (1, 2, 2)
    c.prep.min_size_zyx = (32, 48, 64)
    c.prep.vocab_size = 512
    # Tokens stored per anatomy text, incl. [CLS] and [EOS]: the longest demo text (a lung text) has 153
    # (records/stats.json). The model encodes each anatomy at its own length (model.text.anatomy_len below).
    c.prep.text_len = 160
    c.prep.report_len = 256  # whole report for the CLIP baseline: p95 is 227 tokens
    # Volumes in the records: "none" = raw uint8 (fastest training input); "zlib" = smaller records (2.8x on the
    # realistic volumes of bench/input_stream.py) at about 4x the decoding CPU time.
    c.prep.volume_encoding = "none"

    c.model = ml_collections.ConfigDict()
    c.model.input_zyx = (32, 48, 64)
    c.model.embed_dim = 64
    c.model.pool_heads = 4
    c.model.vision = ml_collections.ConfigDict(dict(
        patch_zyx=(8, 8, 8), width=64, depth=2, heads=4, mlp_dim=256, feature_blocks=(1,),
        stem_channels=(16, 32),  # non-linear conv stem (see ViT3D); () = the paper's linear patch embedding
        # A 2D ViT checkpoint to start from (fvlm_jax.pretrained, docs/training.md "Pretrained encoders"): MAE's
        # PyTorch state dict (.pth) or a timm .safetensors file. Its blocks must match width/depth/mlp_dim (heads
        # cannot be read from the file: ViT-B has 12). The 3D patch embedding is "fresh" (random, as the paper) or
        # "inflate"d from the 2D one (needs stem_channels=() and the 2D patch size as (y, x) of patch_zyx).
        init="", init_patch="fresh"))
    c.model.text = ml_collections.ConfigDict(dict(
        vocab_size=c.prep.get_ref("vocab_size"), max_len=256, width=64, depth=2, heads=4, mlp_dim=256,
        # "pre_ln": this project's pre-LayerNorm encoder; "bert": Hugging Face BERT's (post-LN, token-type and
        # embedding LayerNorm; the settings below are BERT-base's).
        arch="pre_ln", bert=dict(type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu"),
        # A Hugging Face BERT folder (config.json, model.safetensors or pytorch_model.bin, vocab.txt): its weights
        # start the text encoder, and arch, vocab_size, max_len, width, depth, heads, mlp_dim and bert come from its
        # config.json (overriding the values here, logged); --mode=prepare then tokenises with its WordPiece.
        init="",
        # Tokens per anatomy text: the 95th percentile of each anatomy's demo texts, rounded up to a multiple of 8,
        # as `python -m fvlm_jax.tools.text_lengths <workdir> p95` prints it from records/stats.json ("p95" here would
        # take it from there at train time; written out, the config also runs without prepared records). 352
        # tokens per volume, against 7 x 48 = 336 at one length of 48, which cut 34 % of the lung texts.
        anatomy_len="aorta=40,esophagus=32,heart=56,kidney=32,liver=48,lung=112,spleen=32"))
    # mode "clip": the forward pass clips the parameter to [min, max] (past a bound its gradient is zero, so it can
    # stay there). "clamp": the forward pass uses the parameter, which the train step puts back into [min, max]
    # after each update, as the public code's temp.clamp_ (reference).
    c.model.temperature = ml_collections.ConfigDict(dict(init=0.07, min=0.001, max=0.5, mode="clip"))
    c.model.dtype = "float32"  # compute dtype; parameters and optimizer state stay float32
    # Dropout rate in the image encoder's blocks (attention output, MLP hidden and output) and on the anatomy
    # pooling's attention weights; training only (reference: 0.1, MONAI's ViT and torch's MultiheadAttention).
    c.model.dropout = 0.0
    c.model.gelu = "tanh"  # "tanh" (jax.nn.gelu's default) or "erf" (exact; torch's nn.GELU and BERT: reference)
    c.model.remat = False  # recompute transformer blocks in the backward pass (saves activation memory)
    # What the backward pass may keep when remat is on: a jax.checkpoint_policies name. "nothing_saveable" keeps
    # only block inputs; "dots_with_no_batch_dims_saveable" keeps the matmul outputs (faster, more memory).
    c.model.remat_policy = "nothing_saveable"
    # Attention kernel: "auto" = the hand-written one on CPU, cuDNN's fused kernel for the image encoder on NVIDIA
    # GPUs in bf16/fp16 (XLA's if cuDNN refuses), XLA's otherwise; or force "cpu", "xla" or "cudnn".
    c.model.attention = "auto"

    c.loss = ml_collections.ConfigDict()
    c.loss.normal_pairs = True  # normal false-negative correction
    c.loss.same_text_pairs = True
    c.loss.disease_pairs = True  # disease-aware pairing of abnormal samples (reference: False)
    # An anatomy whose positive pairs are all pairs of its valid samples (every target row uniform) contributes 0,
    # as the public blip_pretrain.py:267 skips it (reference: True).
    c.loss.skip_all_positive = False
    # "gspmd": the loss as one jitted function, XLA chooses the collectives. "shard_map": each device computes its
    # own rows against all-gathered embeddings (fvlm_jax.losses.sharded_anatomy_contrastive_loss).
    c.loss.impl = "gspmd"
    # Co-teaching (the paper's; not in the public code; docs/method.md "Co-teaching"): fVLM trains a second model
    # (seed + 1, its own flips and dropout) on the same batches; on the valid abnormal samples each model's targets
    # become (1 - a) targets + a softmax(peer's similarities), the peer's without gradient. a is 0 before
    # coteach_start_step (after the learning-rate warm-up, when the peer's similarities mean something), then rises
    # linearly to coteach_alpha over coteach_ramp_steps. Evaluation and export use the first model.
    c.loss.coteach = False
    c.loss.coteach_alpha = 0.5  # the paper's
    c.loss.coteach_start_step = 50  # this config's train.warmup_steps (configs/ct_rate.py: its own)
    c.loss.coteach_ramp_steps = 50

    c.train = ml_collections.ConfigDict()
    c.train.methods = ("fvlm", "clip")  # mode=all trains each, same data and budget
    c.train.batch_size = 32
    c.train.steps = 700
    c.train.learning_rate = 1e-3
    c.train.init_learning_rate = 1e-5
    c.train.end_learning_rate = 1e-5
    c.train.warmup_steps = 50
    c.train.weight_decay = 0.01
    c.train.grad_clip_norm = 1.0  # 0 = off (the public code does not clip)
    # Split the global batch into this many micro-batches and accumulate exactly (the contrastive loss still sees
    # the whole batch: embeddings first, then one encoder backward pass per micro-batch). 1 = off.
    c.train.grad_accum_steps = 1
    c.train.tensorboard = True  # TensorBoard event files in the train folder, tensorboard/ (tensorboardX)
    c.train.flip_prob = 0.2
    c.train.log_every = 25
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 4  # steps 200, 400, 600, 700: evaluation chooses among them on the valid split

    # Mesh axes (data, fsdp, tensor); data = -1 takes the devices the other two leave. The batch is split over
    # data x fsdp; fsdp also splits every weight and optimizer moment; tensor splits heads and MLP columns.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # Logical axis name -> mesh axes, for every weight and the main activations (fvlm_jax/sharding.py).
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = sharding.DEFAULT_RULES

    c.eval = ml_collections.ConfigDict()
    c.eval.tasks = TASKS
    c.eval.prompt_variants = PROMPT_VARIANTS  # () = one prompt pair per task, the one in eval.tasks
    c.eval.batch_size = 32
    # Which checkpoints are candidates: "latest", "all" (every one train.keep_checkpoints kept) or steps "200,400".
    # Each method's step is the candidate with the best macro AUC on data.threshold_split (the valid split); only
    # then is data.eval_split scored. Both methods are selected the same way.
    c.eval.checkpoints = "all"
    # "scan": one record per scan (CT-RATE: the reconstruction with the lowest number, train_1_a_1 of train_1_a_*);
    # "reconstruction": every record (as fVLM's issue #12 counted). The demo has one reconstruction per scan.
    c.eval.count = "scan"
    # Percentile intervals over bootstrap draws of patients (all scans of a drawn patient go in), seeded; the same
    # draws for every task and method.
    c.eval.bootstrap_draws = 1000
    c.eval.bootstrap_seed = 0
    # "project": the protocol above (one centre crop of model.input_zyx per scan, prompt pairs averaged, retrieval).
    # "public": fVLM's public eval.py (docs/evaluation.md, "The public protocol"): one window per anatomy of at least
    # eval.public_crop_zyx around it (position embeddings resized to its grid), eval.public_tasks (() = eval.tasks)
    # with one prompt pair per task, 0 for a task whose anatomy the scan lacks, no retrieval.
    c.eval.protocol = "project"
    c.eval.public_crop_zyx = (32, 64, 64)  # the demo's input with y 2 patches longer, as eval.py's 112 x 288 x 352
    c.eval.public_tasks = ()

    if arg == "tiny":  # the tests' shared config (configs/demo.py:tiny): seconds per stage on a 2-core CPU
        c.data.update(num_train=32, num_valid=12, num_test=12, num_shards=2)
        c.train.update(batch_size=8, steps=4, warmup_steps=1, checkpoint_every=2, log_every=1)
        c.model.vision.width = c.model.text.width = c.model.embed_dim = 32
        # One block per encoder: a fifth less compile time per train step. feature_blocks=(1,) still pools two
        # levels (block 1's tokens and the final norm's); depth-2 encoders are built in tests/test_pretrained.py.
        c.model.vision.depth = c.model.text.depth = 1
        c.model.text.anatomy_len = ""  # one text-encoder call: half the compile time (tests/test_text_lengths.py
        # covers the per-anatomy lengths)
    elif arg:
        raise ValueError(f"configs/demo.py:{arg}: unknown variant (the one variant is 'tiny')")
    return c
