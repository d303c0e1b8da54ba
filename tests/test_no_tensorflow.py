"""Model, loss, train step, export and the exported Predictor run where TensorFlow is not installed."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # subprocesses or training: not in the fast lane

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["tensorflow"] = None  # any `import tensorflow` now raises ImportError
    sys.modules["tensorflow_datasets"] = None
    from configs import demo
    from fvlm_jax import evaluate, export, losses, sharding, stages, synthetic, train
    cfg = demo.get_config("tiny")
    cfg.train.batch_size = 4
    trainer = train.Trainer(cfg, "fvlm", sharding.make_mesh(cfg))
    batch = synthetic.random_batch(cfg, 4)
    # The step's loss (that of the parameters before it) against the NumPy loop of tests/test_losses.py on the
    # model's embeddings of the batch.
    import numpy as np
    from flax import nnx
    model = trainer.model()
    # Compiled: run op by op, the encoders cost 5x the CPU time.
    img, _, intact = nnx.jit(lambda m, x, lab: m.encode_image(x, lab))(model, batch["image"] / 255.0, batch["labels"])
    txt = nnx.jit(lambda m, t: m.encode_anatomy_texts(t, trainer.text_lengths))(model, batch["text_tokens"])
    by_anatomy = [np.swapaxes(np.asarray(x), 0, 1) for x in (
        img, txt, np.asarray(intact) & batch["has_text"], batch["normal"], batch["text_id"], batch["disease"])]
    temperature = float(model.temp())
    loss = float(trainer.train_step(batch)["loss"])
    sys.path.insert(0, "tests")
    from test_losses import reference_anatomy_loss
    want = reference_anatomy_loss(*by_anatomy, temperature)
    assert abs(loss - want) <= 1e-4 * want, (loss, want)

    # Export, load and score a new scan (NIfTI written here) without TensorFlow.
    import os, tempfile
    import nibabel as nib
    import numpy as np
    from input_pipeline import demo_data
    from input_pipeline.tokenizer import train_tokenizer
    from input_pipeline.totalseg_classes import CLASS_TABLES

    tmp = tempfile.mkdtemp()
    case = demo_data.generate_case(np.random.default_rng(0))
    nib.save(nib.Nifti1Image(case["image"], case["affine"]), os.path.join(tmp, "ct.nii.gz"))
    nib.save(nib.Nifti1Image(case["seg"], case["affine"]), os.path.join(tmp, "seg.nii.gz"))
    train_tokenizer([case["findings"], case["impression"]] * 10, os.path.join(tmp, "tok.model"), 64)
    out = export.export(trainer.model(), "fvlm", cfg, os.path.join(tmp, "tok.model"), CLASS_TABLES["total"],
                        os.path.join(tmp, "export"))
    pred = export.Predictor(out)
    scores = pred.score(os.path.join(tmp, "ct.nii.gz"), os.path.join(tmp, "seg.nii.gz"))
    assert len(scores) == len(cfg.eval.tasks)
    # Each score: the two-way softmax of its prompts' similarities to its anatomy's embedding, by hand.
    emb = pred.encode(os.path.join(tmp, "ct.nii.gz"), os.path.join(tmp, "seg.nii.gz"))["embeddings"]
    pairs = {i: [[t["negative"], t["positive"]], *t["variants"]] for i, t in enumerate(pred.tasks)}  # averaged
    texts = [p for i in pairs for pair in pairs[i] for p in pair]  # every task's prompts in one call
    encode_text = nnx.jit(lambda m, t: m.encode_text(t))
    embedded = np.asarray(encode_text(pred.model, pred.tokenizer.encode(texts, pred.prep["text_len"])), np.float64)
    start = 0
    for i, t in enumerate(pred.tasks):
        prompt = embedded[start:start + 2 * len(pairs[i])].reshape(len(pairs[i]), 2, -1).mean(0)
        start += 2 * len(pairs[i])
        s_neg, s_pos = prompt @ emb[t["anatomy"]] / float(pred.model.temp())
        want = 1 / (1 + np.exp(s_neg - s_pos))
        assert abs(scores[f"{t['anatomy']}/{t['label']}"] - want) < 1e-5, (t, scores, want)
    assert "tensorflow" not in sys.modules or sys.modules["tensorflow"] is None
    print("OK")
""")


BENCH = textwrap.dedent("""
    import runpy, sys
    sys.argv = ["bench/train_step.py", "--preset=tiny", "--steps=1", "--batch=4", "--peak_tflops=1"]  # the
    # script's whole path at the tests' size
    runpy.run_path("bench/train_step.py", run_name="__main__")
""")


def test_core_and_train_step_benchmark_run_without_tensorflow():
    """One process with TensorFlow unimportable and 2 CPU devices: the model, loss, train step, export and
    Predictor (SCRIPT), then bench/train_step.py, the script for accelerator hosts (no TensorFlow there), whose MFU
    is taken against both devices' peak."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()  # keeps the
    # tests' fast-compile flags (tests/conftest.py)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    res = subprocess.run([sys.executable, "-c", SCRIPT + BENCH], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
    assert "device: 2 x cpu" in res.stdout and "of 2 x 1 TFLOP/s" in res.stdout, res.stdout
    assert res.stdout.count("step time:") == 3
