"""The global-batch train step gives the same losses on 1 device and on a data mesh of 8 fake CPU devices; a
checkpoint saved on 8 devices restores on 4."""

import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np
    from configs import demo
    from fvlm_jax import synthetic, train

    cfg = demo.get_config()
    cfg.model.vision.width = cfg.model.text.width = 32
    cfg.train.batch_size = 8
    out = {}
    for method in ("fvlm", "clip"):
        for n in (1, 8):
            cfg.mesh.data = n
            trainer = train.Trainer(cfg, method, train.make_mesh(cfg))
            losses = []
            for step in range(3):
                m = trainer.train_step(synthetic.random_batch(cfg, 8, seed=step))
                losses.append(float(m["loss"]))
            out[f"{method}{n}"] = losses
            assert len(trainer.state["params"]["pool"]["q"]["kernel"].sharding.device_set) == n
    # A checkpoint written on the 8-device mesh restores on a 4-device mesh.
    import sys, tempfile
    import numpy as np
    cfg.mesh.data = 8
    eight = train.Trainer(cfg, "fvlm", train.make_mesh(cfg))
    eight.train_step(synthetic.random_batch(cfg, 8, seed=0))
    ckpt_dir = tempfile.mkdtemp()
    mngr = eight.checkpoint_manager(ckpt_dir)
    eight.save(mngr)
    mngr.wait_until_finished()
    cfg.mesh.data = 4
    four = train.Trainer(cfg, "fvlm", train.make_mesh(cfg))
    assert four.restore(four.checkpoint_manager(ckpt_dir)) and four.step == 1
    for a, b in zip(jax.tree.leaves(eight.state), jax.tree.leaves(four.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(four.state["params"]["pool"]["q"]["kernel"].sharding.device_set) == 4
    print("LOSSES", out)
""")


def test_one_device_equals_eight_devices():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = eval(res.stdout.split("LOSSES", 1)[1])  # noqa: S307 - our own printed dict
    for method in ("fvlm", "clip"):
        np.testing.assert_allclose(out[f"{method}1"], out[f"{method}8"], rtol=2e-5, atol=2e-5)
        assert out[f"{method}1"][0] != out[f"{method}1"][2]  # the parameters did change
