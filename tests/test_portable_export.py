"""The portable encoders of an export (fvlm_jax.portable): a fresh process with only jax and numpy loads the
jax.export modules and their weights and reproduces the Predictor's embeddings on the real CT and a demo phantom."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import SHARED_DATA, write_demo_case

from fvlm_jax.export import Predictor

pytestmark = pytest.mark.slow  # a subprocess

SERVE = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np

    folder, data = sys.argv[1], sys.argv[2]

    def load(name):
        exported = jax.export.deserialize(bytearray(open(f"{folder}/{name}_encoder.jax", "rb").read()))
        return exported, dict(np.load(f"{folder}/{name}_weights.npz"))

    image_enc, image_w = load("image")
    text_enc, text_w = load("text")
    image, labels = np.load(f"{data}/image.npy"), np.load(f"{data}/labels.npy")
    emb, present, intact = (np.asarray(x) for x in image_enc.call(image_w, image, labels))
    one = np.asarray(image_enc.call(image_w, image[:1], labels[:1])[0])  # the batch dimension is symbolic
    text = np.asarray(text_enc.call(text_w, np.load(f"{data}/tokens.npy")))
    print(json.dumps({
        "image": float(np.abs(emb - np.load(f"{data}/emb.npy")).max()),
        "batch_of_one": float(np.abs(one - emb[:1]).max()),
        "text": float(np.abs(text - np.load(f"{data}/text.npy")).max()),
        "present": present.tolist(), "intact": intact.tolist(), "platforms": list(image_enc.platforms),
        "batch_dim": str(image_enc.in_avals[-1].shape[0]),
        "modules": sorted(m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("flax", "fvlm_jax",
                                                                                      "input_pipeline", "optax"))}))
""")


def test_fresh_process_reproduces_the_predictor(tiny_export, tmp_path):
    example = SHARED_DATA / "totalseg_example"
    if not example.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (the real CTs live beside the checkout)")
    pred = Predictor(str(tiny_export))
    ct, seg, _ = write_demo_case(tmp_path, "demo", 5)
    scans = [(example / "example_ct_sm.nii.gz", example / "example_seg.nii.gz"), (ct, seg)]
    inputs = [pred.preprocess(str(c), str(s)) for c, s in scans]
    encoded = [pred.encode(str(c), str(s)) for c, s in scans]
    np.save(tmp_path / "image.npy", np.stack([x["image"] for x in inputs]))
    np.save(tmp_path / "labels.npy", np.stack([x["labels"] for x in inputs]))
    np.save(tmp_path / "emb.npy", np.stack([np.stack([e["embeddings"][n] for n in pred.embedding_names])
                                            for e in encoded]))
    tokens = pred.tokenizer.encode([p for t in pred.tasks for p in (t["negative"], t["positive"])],
                                   pred.prep["text_len"])
    np.save(tmp_path / "tokens.npy", tokens)
    main_pairs = [{**t, "variants": []} for t in pred.tasks]  # the tokens above: each task's own pair alone
    np.save(tmp_path / "text.npy", pred.prompt_embeddings(main_pairs).reshape(len(tokens), -1))

    res = subprocess.run([sys.executable, "-c", SERVE, str(tiny_export / "portable"), str(tmp_path)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["image"] <= 1e-5 and out["text"] <= 1e-5 and out["batch_of_one"] <= 1e-5, out
    assert out["present"] == [[e["present"][a] for a in pred.anatomies] for e in encoded]
    assert out["intact"] == [[e["intact"][a] for a in pred.anatomies] for e in encoded]
    assert out["platforms"] == ["cpu", "cuda", "tpu"] and out["batch_dim"] == "b"
    assert out["modules"] == [], out  # neither Flax nor this project's code was imported
    meta = json.loads((tiny_export / "portable" / "portable.json").read_text())
    assert meta["embedding_names"] == pred.embedding_names and meta["text_len"] == pred.prep["text_len"]
    assert meta["temperature"] == pytest.approx(float(pred.model.temp()))
    print(f"max |portable - Predictor|: image {out['image']:.2e}, text {out['text']:.2e}")
