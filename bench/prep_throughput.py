"""Preparation throughput: our `preprocess.preprocess_scan` vs real MONAI and a MONAI-style path, on the same scans.

Run: python bench/prep_throughput.py [--n 6] [--shape 256 256 120] [--rounds 3] [--monai_python PATH]
     [--monai_spacing_dtype float64|float32]

Writes N synthetic CT + TotalSegmentator-style multi-label NIfTIs (int16 HU, 0.8 x 0.8 x 2.5 mm, LPS-stored like
DICOM conversions, a few box/ellipsoid anatomies with TotalSegmentator v2 ids) to a temp dir, then times each path
in its own fresh single-process worker (so each peak RSS is its own), in `--rounds` alternating rounds:

* "ours": `input_pipeline.preprocess.preprocess_scan`.
* "monai": real MONAI dictionary transforms (LoadImaged -> EnsureChannelFirstd -> Orientationd("RAS") ->
  Spacingd -> ScaleIntensityRanged(clip) -> CropForegroundd(label) -> SpatialPadd), torch on 1 thread. MONAI and
  torch are not dependencies of fvlm-jax: this worker runs under `--monai_python` (default: this interpreter if
  it imports monai, else /tmp/torchenv/bin/python if that does); without one the row is skipped.
* "monai_style": the same chain re-implemented with nibabel + scipy (whole float32 volume loaded, reoriented,
  resampled with `ndimage.zoom`, then cropped), for hosts without MONAI.

A benchmark that prints figures, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPACING_XYZ = (1.0, 1.0, 3.0)
HU_WINDOW = (-1150.0, 350.0)
MARGIN_ZYX = (5, 20, 20)
MIN_SIZE_ZYX = (112, 256, 352)
ANATOMIES = {
    "lung": ["lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
             "lung_lower_lobe_right"],
    "heart": ["heart"],
    "liver": ["liver"],
    "kidney": ["kidney_left", "kidney_right"],
}


def _ellipsoid(grid, centre, radii):
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def make_scan(shape_ijk, spacing, rng):
    """(ct int16 HU [I, J, K], seg int16 class ids, affine). Stored LPS-like: i -> L, j -> P, k -> S."""
    ni, nj, nk = shape_ijk
    grid = np.ogrid[:ni, :nj, :nk]
    ct = np.full(shape_ijk, -1000, np.int16)
    seg = np.zeros(shape_ijk, np.int16)
    body = _ellipsoid(grid[:2], (ni / 2, nj / 2), (0.42 * ni, 0.33 * nj))  # [I, J, 1] cylinder
    ct[np.broadcast_to(body, shape_ijk)] = 40
    j0 = rng.uniform(-4, 4)
    parts = [  # (class id, centre (fraction), radii (fraction), HU)
        (12, (0.32, 0.50, 0.72), (0.12, 0.20, 0.22), -850), (14, (0.32, 0.52, 0.50), (0.12, 0.20, 0.12), -850),
        (10, (0.68, 0.50, 0.72), (0.12, 0.20, 0.22), -850), (11, (0.68, 0.52, 0.50), (0.12, 0.20, 0.12), -850),
        (51, (0.55, 0.40, 0.58), (0.10, 0.10, 0.10), 45), (5, (0.33, 0.45, 0.30), (0.14, 0.15, 0.10), 60),
        (2, (0.38, 0.65, 0.15), (0.05, 0.05, 0.08), 30), (3, (0.62, 0.65, 0.15), (0.05, 0.05, 0.08), 30),
        (31, (0.50, 0.75, 0.40), (0.03, 0.03, 0.45), 700),
    ]
    for cid, c, r, hu in parts:
        centre = (c[0] * ni, c[1] * nj + j0, c[2] * nk)
        m = _ellipsoid(grid, centre, (r[0] * ni, r[1] * nj, r[2] * nk))
        ct[m] = hu
        seg[m] = cid
    ct += rng.normal(0, 15, shape_ijk).astype(np.int16)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = (ni * spacing[0] / 2, nj * spacing[1] / 2, -nk * spacing[2] / 2)
    return ct, seg, affine


def write_inputs(folder, n, shape, spacing, seed=0):
    import nibabel as nib
    rng = np.random.default_rng(seed)
    pairs = []
    for s in range(n):
        ct, seg, aff = make_scan(shape, spacing, rng)
        ip, sp = os.path.join(folder, f"ct_{s}.nii.gz"), os.path.join(folder, f"seg_{s}.nii.gz")
        nib.save(nib.Nifti1Image(ct, aff), ip)
        nib.save(nib.Nifti1Image(seg, aff), sp)
        pairs.append((ip, sp))
    return pairs


def ours(image_path, seg_path):
    from input_pipeline import preprocess
    from input_pipeline.totalseg_classes import TOTAL_V2
    out = preprocess.preprocess_scan(image_path, seg_path, class_table=TOTAL_V2, anatomies=ANATOMIES,
                                     spacing_xyz=SPACING_XYZ, hu_window=HU_WINDOW, margin_zyx=MARGIN_ZYX,
                                     min_size_zyx=MIN_SIZE_ZYX)
    return out["image"], out["labels"]


def monai_style(image_path, seg_path):
    """LoadImage -> Orientation(RAS) -> Spacing -> ScaleIntensityRange(clip) -> CropForeground -> SpatialPad."""
    import nibabel as nib
    from nibabel import orientations as nio
    from scipy import ndimage

    img, lab = nib.load(image_path), nib.load(seg_path)
    ct = img.get_fdata(dtype=np.float32)  # LoadImage: whole float32 volume
    seg = lab.get_fdata(dtype=np.float32)
    ornt = nio.io_orientation(img.affine)  # Orientation(axcodes="RAS")
    ct = nio.apply_orientation(ct, ornt)
    seg = nio.apply_orientation(seg, ornt)
    canon = img.affine @ nio.inv_ornt_aff(ornt, img.shape)
    src = np.sqrt((canon[:3, :3] ** 2).sum(axis=0))
    zoom = src / np.asarray(SPACING_XYZ)  # Spacing: resample the WHOLE image (bilinear) and labels (nearest)
    ct = ndimage.zoom(ct, zoom, order=1, mode="nearest")
    seg = ndimage.zoom(seg, zoom, order=0, mode="nearest")
    lo, hi = HU_WINDOW  # ScaleIntensityRange(a_min, a_max, 0, 1, clip=True)
    ct = np.clip((ct - lo) / (hi - lo), 0.0, 1.0)
    seg = _anatomy_lut()[seg.astype(np.intp)]  # label grouping (a MapLabelValue-like transform)
    fg = np.nonzero(seg > 0)  # CropForeground(source_key="label", margin)
    margin_xyz = MARGIN_ZYX[::-1]
    sl = tuple(slice(max(int(f.min()) - m, 0), min(int(f.max()) + 1 + m, n))
               for f, m, n in zip(fg, margin_xyz, ct.shape))
    ct, seg = ct[sl], seg[sl]
    pads = [(max(t - n, 0) // 2, max(t - n, 0) - max(t - n, 0) // 2) for n, t in zip(ct.shape, MIN_SIZE_ZYX[::-1])]
    ct, seg = np.pad(ct, pads), np.pad(seg, pads)  # SpatialPad
    image = np.rint(ct * 255.0).astype(np.uint8).transpose(2, 1, 0)  # same stored product: uint8 (z, y, x)
    return image, seg.astype(np.uint8).transpose(2, 1, 0)


def _anatomy_lut():
    """TotalSegmentator v2 class id -> anatomy index + 1 (0 = not in any anatomy), float32."""
    from input_pipeline.totalseg_classes import TOTAL_V2
    lut = np.zeros(max(TOTAL_V2) + 1, np.float32)
    by_name = {v: k for k, v in TOTAL_V2.items()}
    for a, names in enumerate(ANATOMIES.values()):
        lut[[by_name[nm] for nm in names]] = a + 1
    return lut


def make_monai(spacing_dtype="float64"):
    """Real MONAI dictionary transforms, the way CT pipelines built on MONAI usually prepare scans."""
    import monai.transforms as mt
    import torch
    torch.set_num_threads(1)  # per-core comparable with the single-threaded numpy / scipy paths
    lut = torch.from_numpy(_anatomy_lut())
    keys = ("image", "label")
    xform = mt.Compose([
        mt.LoadImaged(keys, image_only=True),  # whole volumes as float32 MetaTensors
        mt.EnsureChannelFirstd(keys),
        mt.Orientationd(keys, axcodes="RAS"),
        # MONAI defaults otherwise; dtype = resampling precision (MONAI's default float64, --monai_spacing_dtype).
        mt.Spacingd(keys, pixdim=SPACING_XYZ, mode=("bilinear", "nearest"), dtype=getattr(np, spacing_dtype)),
        mt.ScaleIntensityRanged("image", a_min=HU_WINDOW[0], a_max=HU_WINDOW[1], b_min=0.0, b_max=1.0, clip=True),
        mt.Lambdad("label", lambda x: lut[x.long()]),  # class ids -> anatomy index (a MapLabelValue-like step)
        # Crop to the anatomies + margin (clipped at the volume like ours: allow_smaller=True), pad to the minimum.
        mt.CropForegroundd(keys, source_key="label", select_fn=lambda x: x > 0, margin=MARGIN_ZYX[::-1],
                           allow_smaller=True),
        mt.SpatialPadd(keys, spatial_size=MIN_SIZE_ZYX[::-1]),
    ])

    def run(image_path, seg_path):
        d = xform({"image": image_path, "label": seg_path})
        img = d["image"].as_tensor()[0].numpy()  # (x, y, z) after EnsureChannelFirst + RAS
        lab = d["label"].as_tensor()[0].numpy()
        image = np.rint(img * np.float32(255.0)).astype(np.uint8).transpose(2, 1, 0)  # same product: uint8 (z, y, x)
        return np.ascontiguousarray(image), np.ascontiguousarray(lab.astype(np.uint8).transpose(2, 1, 0))

    return run


PATHS = {"ours": lambda **_: ours, "monai": make_monai, "monai_style": lambda **_: monai_style}


def worker(method, folder, n, save, **options):
    fn = PATHS[method](**options)
    pairs = [(os.path.join(folder, f"ct_{s}.nii.gz"), os.path.join(folder, f"seg_{s}.nii.gz")) for s in range(n)]
    fn(*pairs[0])  # warm-up (imports, caches); not timed
    t0, c0 = time.perf_counter(), os.times()
    for i, (ip, sp) in enumerate(pairs):
        image, labels = fn(ip, sp)
        if i == 0 and save:
            np.savez(save, image=image, labels=labels)
    t1, c1 = time.perf_counter(), os.times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"wall": t1 - t0, "cpu": cpu, "n": n, "rss_kb": rss, "shape": list(image.shape)}))


def _imports_monai(python):
    try:
        return subprocess.run([python, "-c", "import monai, torch"], capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def find_monai_python(requested):
    """(interpreter or None, note). `requested`: a path, "none" to skip, or None for the default search."""
    if requested is not None:
        if requested.lower() == "none":
            return None, "MONAI row skipped (--monai_python none)."
        if _imports_monai(requested):
            return requested, f"MONAI path runs under {requested}."
        return None, f"MONAI row skipped: {requested} cannot import monai and torch."
    for cand in (sys.executable, "/tmp/torchenv/bin/python"):
        if os.path.exists(cand) and _imports_monai(cand):
            return cand, f"MONAI path runs under {cand}."
    return None, ("MONAI row skipped: neither this interpreter nor /tmp/torchenv/bin/python imports monai and torch "
                  "(pass --monai_python PATH).")


def _compare(tmp, other):
    a, b = np.load(os.path.join(tmp, "ours.npz")), np.load(os.path.join(tmp, f"{other}.npz"))
    sa, sb = a["image"].shape, b["image"].shape
    common = tuple(slice(0, min(x, y)) for x, y in zip(sa, sb))
    diff = np.abs(a["image"][common].astype(np.int16) - b["image"][common].astype(np.int16))
    lab_agree = float(np.mean(a["labels"][common] == b["labels"][common]))
    same = all(abs(x - y) <= 1 for x, y in zip(sa, sb))
    return (f"ours vs {other}: shapes {sa} vs {sb} ({'within 1 voxel' if same else 'DIFFER'}); image |diff| on the "
            f"common block: mean {diff.mean():.2f}, p99 {np.percentile(diff, 99):.0f} (uint8 levels); labels agree "
            f"on {100 * lab_agree:.2f}% of voxels")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6, help="number of synthetic scans")
    ap.add_argument("--shape", type=int, nargs=3, default=(256, 256, 120), help="file shape I J K")
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 2.5))
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; every path runs once per round")
    ap.add_argument("--monai_python", help="interpreter with monai + torch for the 'monai' path ('none' skips it); "
                    "default: this one if it imports monai, else /tmp/torchenv/bin/python if that does")
    ap.add_argument("--monai_spacing_dtype", choices=("float64", "float32"), default="float64",
                    help="Spacingd's resampling dtype in the 'monai' path (MONAI's default: float64)")
    ap.add_argument("--worker", choices=("write", *PATHS), help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "write":
        write_inputs(args.dir, args.n, tuple(args.shape), tuple(args.spacing))
        return
    if args.worker:
        worker(args.worker, args.dir, args.n, args.save, spacing_dtype=args.monai_spacing_dtype)
        return

    monai_python, note = find_monai_python(args.monai_python)
    pythons = {"ours": sys.executable, "monai": monai_python, "monai_style": sys.executable}
    methods = [m for m in PATHS if pythons[m]]
    with tempfile.TemporaryDirectory(prefix="fvlm_prep_bench_") as tmp:
        t0 = time.perf_counter()
        # Heavy work runs in children of this small parent, so each child's ru_maxrss is its own.
        subprocess.run([sys.executable, __file__, "--worker", "write", "--dir", tmp, "--n", str(args.n), "--shape",
                        *map(str, args.shape), "--spacing", *map(str, args.spacing)], check=True)
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)) / 2**20
        print(f"inputs: {args.n} scans {tuple(args.shape)} int16 at {tuple(args.spacing)} mm + multi-label seg, "
              f"{size:.1f} MiB .nii.gz, written in {time.perf_counter() - t0:.1f} s")
        print(f"target: spacing {SPACING_XYZ}, window {HU_WINDOW}, margin_zyx {MARGIN_ZYX}, min_size_zyx "
              f"{MIN_SIZE_ZYX}; single process, cores available {len(os.sched_getaffinity(0))}")
        print(note + (f" Spacingd dtype {args.monai_spacing_dtype}." if monai_python else ""))
        res = {m: [] for m in methods}
        for r in range(args.rounds):
            for method in methods if r % 2 == 0 else methods[::-1]:  # alternate the order between rounds
                cmd = [pythons[method], __file__, "--worker", method, "--dir", tmp, "--n", str(args.n),
                       "--monai_spacing_dtype", args.monai_spacing_dtype]
                if r == 0:
                    cmd += ["--save", os.path.join(tmp, f"{method}.npz")]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"worker {method} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
                res[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
        checks = [_compare(tmp, m) for m in methods if m != "ours"]

    rate = {m: [r["n"] / r["cpu"] for r in rs] for m, rs in res.items()}
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("wall", "cpu")} for m, rs in res.items()}
    n = args.n
    print()
    print(f"median of {args.rounds} round(s); peak RSS = largest over the rounds")
    print(f"{'path':<14}{'scans/s':>9}{'scans/CPU-s':>13}{'s/scan':>9}{'peak RSS MiB':>14}  output shape (z, y, x)")
    for m, rs in res.items():
        print(f"{m:<14}{n / med[m]['wall']:>9.2f}{statistics.median(rate[m]):>13.2f}{med[m]['wall'] / n:>9.2f}"
              f"{max(r['rss_kb'] for r in rs) / 1024:>14.0f}  {tuple(rs[0]['shape'])}")
    print("scans/CPU-s per round: " + "; ".join(f"{m} " + ", ".join(f"{v:.2f}" for v in rate[m]) for m in methods))
    for m in methods:
        if m == "ours":
            continue
        label = "MONAI" if m == "monai" else "MONAI-style"
        ratio = statistics.median(rate["ours"]) / statistics.median(rate[m])
        per_round = ", ".join(f"{a / b:.2f}" for a, b in zip(rate["ours"], rate[m]))
        print(f"speed-up ours / {label}: {ratio:.2f}x per CPU-second, {med[m]['wall'] / med['ours']['wall']:.2f}x "
              f"wall (medians; target >= 2x); per round {per_round}")
    for line in checks:
        print(line)
    me, ch = (resource.getrusage(w).ru_maxrss / 1024 for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(f"peak RSS: this process {me:.0f} MiB, largest child {ch:.0f} MiB (each worker's own peak is in the table)")


if __name__ == "__main__":
    main()
