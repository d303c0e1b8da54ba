"""Model, loss, train step, evaluation and export import and run where TensorFlow is not installed."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["tensorflow"] = None  # any `import tensorflow` now raises ImportError
    sys.modules["tensorflow_datasets"] = None
    from configs import demo
    from fvlm_jax import evaluate, export, losses, stages, synthetic, train
    cfg = demo.get_config()
    cfg.train.batch_size = 4
    trainer = train.Trainer(cfg, "fvlm", train.make_mesh(cfg))
    loss = float(trainer.train_step(synthetic.random_batch(cfg, 4))["loss"])
    assert loss == loss
    print("OK")
""")


def test_core_runs_without_tensorflow():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
