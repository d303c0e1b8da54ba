"""Seeded synthetic CT phantoms written in the formats real users have (CT-RATE layout + TotalSegmentator masks).

Every case is a low-resolution chest / upper-abdomen CT (about 80 x 64 x 40 voxels at about 4 x 4 x 7 mm) with
seven anatomies (lung, heart, esophagus, aorta, liver, spleen, kidney) and up to 15 simulated diseases, each
drawn visibly inside its anatomy's mask, plus a free-text report and label tables that agree with the image.

Conventions:
- World coordinates follow NIfTI/nibabel RAS+ in mm: x grows from the patient's left to Right, y
  towards Anterior, z towards Superior. The NIfTI affine maps voxel indices to these coordinates.
- The metadata CSV follows DICOM (as CT-RATE does): ImagePositionPatient / ImageOrientationPatient are in LPS,
  describing the same voxel grid as the stored NIfTI array (first array axis = DICOM row direction).
- About half of the scans are stored in LPS voxel order (x and y axes flipped, affine to match) so that
  consumers must reorient; the world-space anatomy does not depend on the storage order.
"""

from __future__ import annotations

import csv
import os

import nibabel as nib
import numpy as np
from scipy import ndimage

ANATOMIES = ("lung", "heart", "esophagus", "aorta", "liver", "spleen", "kidney")
DISEASES = {
    "lung": ("Lung nodule", "Emphysema", "Pleural effusion", "Consolidation"),
    "heart": ("Cardiomegaly", "Pericardial effusion", "Coronary artery wall calcification"),
    "esophagus": ("Hiatal hernia",),
    "aorta": ("Arterial wall calcification",),
    "liver": ("Liver lesion", "Hepatic steatosis"),
    "spleen": ("Splenomegaly",),
    "kidney": ("Renal cyst",),
}
CT_RATE_LABELS = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion", "Mosaic attenuation pattern",
    "Peribronchial thickening", "Consolidation", "Bronchiectasis", "Interlobular septal thickening",
)
EXTRA_LABELS = ("Liver lesion", "Hepatic steatosis", "Renal cyst", "Splenomegaly")

# TotalSegmentator v2 "total" class ids (hard-coded so the generator needs no shared files at run time).
SEG_IDS = {
    "spleen": (1,), "kidney": (2, 3), "liver": (5,), "lung": (10, 11, 12, 13, 14), "esophagus": (15,),
    "heart": (51,), "aorta": (52,),
}
_SPLEEN, _KIDNEY_R, _KIDNEY_L, _LIVER = 1, 2, 3, 5
_LUL, _LLL, _RUL, _RML, _RLL = 10, 11, 12, 13, 14
_ESOPHAGUS, _TRACHEA, _HEART, _AORTA = 15, 16, 51, 52
_VERTEBRAE = (29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40)  # L3 .. T4, caudal to cranial
_LOBE_NAMES = {
    _LUL: "left upper lobe", _LLL: "left lower lobe", _RUL: "right upper lobe", _RML: "right middle lobe",
    _RLL: "right lower lobe",
}

_REPORT_COLUMNS = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
_METADATA_COLUMNS = ["VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept",
                     "ImagePositionPatient", "ImageOrientationPatient", "Manufacturer"]
_SPLITS = {"train": ("train", "train", 0), "valid": ("validation", "valid", 1), "test": ("test", "test", 2)}
_HEALTHY_FRACTION = 0.28
_DISEASE_P = 0.2 / (1 - _HEALTHY_FRACTION)  # per-disease prevalence among the non-healthy scans -> ~20% overall
_NOISE_HU = 15.0


class _Grid:
    """A canonical RAS voxel grid; shape primitives are evaluated only inside their bounding box (speed)."""

    def __init__(self, shape, spacing, origin):
        self.shape = tuple(int(s) for s in shape)
        self.spacing = np.asarray(spacing, float)
        self.origin = np.asarray(origin, float)
        self.axes = [self.origin[d] + self.spacing[d] * np.arange(self.shape[d]) for d in range(3)]

    def box(self, lo, hi):
        """Index slices of the voxels whose centres lie in the world box [lo, hi]."""
        out = []
        for d in range(3):
            i0 = int(np.searchsorted(self.axes[d], lo[d], "left"))
            i1 = int(np.searchsorted(self.axes[d], hi[d], "right"))
            out.append(slice(i0, max(i0, i1)))
        return tuple(out)

    def coords(self, sl):
        """Open-grid world coordinates (x [n,1,1], y [1,n,1], z [1,1,n]) of a box."""
        return (self.axes[0][sl[0]][:, None, None], self.axes[1][sl[1]][None, :, None],
                self.axes[2][sl[2]][None, None, :])

    def full_coords(self):
        return self.coords((slice(None),) * 3)

    def ellipsoid(self, center, semi):
        center, semi = np.asarray(center, float), np.asarray(semi, float)
        out = np.zeros(self.shape, bool)
        sl = self.box(center - semi, center + semi)
        x, y, z = self.coords(sl)
        out[sl] = ((x - center[0]) / semi[0]) ** 2 + ((y - center[1]) / semi[1]) ** 2 + (
            (z - center[2]) / semi[2]) ** 2 <= 1.0
        return out

    def tube(self, points, radii):
        """Union of capsules along a polyline; radii per segment (or one number)."""
        points = np.asarray(points, float)
        radii = np.broadcast_to(np.asarray(radii, float), (len(points) - 1,))
        out = np.zeros(self.shape, bool)
        for p0, p1, r in zip(points[:-1], points[1:], radii):
            sl = self.box(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r)
            x, y, z = self.coords(sl)
            d = p1 - p0
            t = ((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / max(float(d @ d), 1e-9)
            t = np.clip(t, 0.0, 1.0)
            dist2 = (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2
            out[sl] |= dist2 <= r * r
        return out

    def world(self, index):
        return self.origin + self.spacing * np.asarray(index, float)


def _inner_distance(mask, spacing):
    """Distance in mm from each mask voxel to the nearest non-mask voxel (0 outside), computed on the bbox."""
    out = np.zeros(mask.shape, float)
    if not mask.any():
        return out
    sl = ndimage.find_objects(mask.astype(np.uint8))[0]
    crop = np.pad(mask[sl], 1)
    out[sl] = ndimage.distance_transform_edt(crop, sampling=spacing)[1:-1, 1:-1, 1:-1]
    return out


def _pick_center(rng, grid, mask, radius, min_radius=None, avoid=()):
    """World centre of a ball of `radius` mm lying fully inside `mask`, away from `avoid` (centre, clearance)."""
    dist = _inner_distance(mask, grid.spacing)
    x, y, z = grid.full_coords()
    for r in np.linspace(radius, min_radius or radius, 4):
        ok = dist >= r
        for c, clearance in avoid:
            ok &= (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 > (clearance + r) ** 2
        idx = np.flatnonzero(ok)
        if idx.size:
            return grid.world(np.unravel_index(rng.choice(idx), grid.shape)), float(r)
    return None, 0.0


def _jitter(rng, scale):
    return rng.normal(0.0, scale, 3).clip(-2 * scale, 2 * scale)


def generate_case(rng: np.random.Generator, templates: bool = False) -> dict:
    """Draws one phantom in memory.

    Returns a dict with "image" (int16 HU [X, Y, Z] in RAS voxel order), "seg" (uint8 TotalSegmentator v2 ids,
    same grid), "affine" (4x4 RAS voxel-to-world, mm), "truth" ({anatomy: sorted list of disease names}),
    "findings" and "impression" (report text), "orientation" ("RAS" or "LPS": how the writer stores it),
    "contrast" (bool) and "details" (per-disease measurements used by the report).
    templates: the findings describe every normal anatomy with the one fixed sentence `template_sentence`, as
    CT-RATE's texts do in the public code (`_write_report`); the same random draws, so only that text differs.
    """
    healthy = rng.random() < _HEALTHY_FRACTION
    wanted = {a: [d for d in ds if not healthy and rng.random() < _DISEASE_P] for a, ds in DISEASES.items()}

    sxy = round(float(rng.uniform(3.6, 4.4)), 3)
    sz = round(float(rng.uniform(6.5, 7.5)), 3)
    spacing = np.array([sxy, sxy, sz])
    shape = (round(330 / sxy), round(260 / sxy), round(310 / sz))
    extent = (np.array(shape) - 1) * spacing
    origin = np.round(-extent / 2 + rng.uniform(-5, 5, 3), 2)
    grid = _Grid(shape, spacing, origin)
    x, y, z = grid.full_coords()

    s = float(rng.uniform(0.92, 1.08))  # patient size

    def f():
        return s * float(rng.uniform(0.95, 1.05))

    seg = np.zeros(shape, np.uint8)
    details: dict[str, dict] = {}

    # --- body ---------------------------------------------------------------------------------------------
    bax, bay = 150 * s * rng.uniform(0.97, 1.03), 110 * s * rng.uniform(0.97, 1.03)
    body = np.broadcast_to(((x / bax) ** 2 + (y / bay) ** 2) <= 1.0, shape)
    fat_mm = rng.uniform(10, 18)
    inner = np.broadcast_to(((x / (bax - fat_mm)) ** 2 + (y / (bay - fat_mm)) ** 2) <= 1.0, shape)
    spine = grid.tube([[0, -75, -400], [0, -75, 400]], 16 * s) & body
    level = np.clip(((z + 150) // 26).astype(int), 0, len(_VERTEBRAE) - 1)
    seg[spine] = np.broadcast_to(np.asarray(_VERTEBRAE, np.uint8)[level], shape)[spine]

    # --- lungs (lowest priority: every other organ is painted over them) ----------------------------------
    lungs = {}
    for side, sign, semi in (("right", 1, (52, 78, 62)), ("left", -1, (48, 76, 60))):
        c = np.array([sign * 68, -5, 58]) + _jitter(rng, 3)
        fs = f()
        m = grid.ellipsoid(c, np.array(semi) * fs)
        lower = (z - c[2]) < -0.8 * (y - c[1]) + 5  # oblique fissure: lower lobe is posterior-inferior
        if side == "right":
            upper = ~lower & ((z - c[2]) > 5)  # horizontal fissure separates the middle lobe
            seg[m & lower] = _RLL
            seg[m & upper] = _RUL
            seg[m & ~lower & ~upper] = _RML
        else:
            seg[m & lower] = _LLL
            seg[m & ~lower] = _LUL
        lungs[side] = c

    # --- abdominal organs ---------------------------------------------------------------------------------
    liver_c = np.array([52, 5, -38]) + _jitter(rng, 3)
    seg[grid.ellipsoid(liver_c, np.array([65, 70, 48]) * f())] = _LIVER

    spleen_c = np.array([-78, -30, -30]) + _jitter(rng, 3)
    spleen_semi = np.array([26, 40, 36]) * f()
    if "Splenomegaly" in wanted["spleen"]:
        spleen_semi = spleen_semi * rng.uniform(1.4, 1.55)
        details["Splenomegaly"] = {"length_cm": round(2 * spleen_semi[2] / 10 * 1.25, 1)}
    seg[grid.ellipsoid(spleen_c, spleen_semi)] = _SPLEEN

    for label, sign in ((_KIDNEY_R, 1), (_KIDNEY_L, -1)):
        kc = np.array([sign * 56, -52, -82]) + _jitter(rng, 3)
        seg[grid.ellipsoid(kc, np.array([24, 22, 35]) * f())] = label

    # --- heart ----------------------------------------------------------------------------------------------
    heart_c = np.array([-12, 28, 35]) + _jitter(rng, 3)
    heart_semi = np.array([50, 42, 44]) * f()
    if "Cardiomegaly" in wanted["heart"]:
        heart_semi = heart_semi * rng.uniform(1.28, 1.38)
        details["Cardiomegaly"] = {"diameter_cm": round(2 * heart_semi[0] / 10, 1)}
    rim = 0.0
    if "Pericardial effusion" in wanted["heart"]:
        rim = float(rng.uniform(6, 10))
        details["Pericardial effusion"] = {"mm": round(rim)}
    myocardium = grid.ellipsoid(heart_c, heart_semi)
    seg[grid.ellipsoid(heart_c, heart_semi + rim) if rim else myocardium] = _HEART

    # --- aorta: ascending, arch to the left of the trachea, descending left-posterior ------------------------
    aorta_pts = np.array([[-2, 22, 50], [-2, 20, 95], [-22, 8, 108], [-28, -20, 105], [-24, -42, 92],
                          [-22, -44, 40], [-12, -40, -30], [-8, -38, -110]], float)
    aorta_pts += _jitter(rng, 2)
    ar = 12 * f()
    aorta_r = np.array([ar * 1.1, ar, ar, ar, ar, ar * 0.9, ar * 0.85])
    seg[grid.tube(aorta_pts, aorta_r)] = _AORTA

    # --- esophagus (behind trachea and heart) and trachea -------------------------------------------------------
    eso_pts = np.array([[3, -22, 110], [0, -24, 60], [-12, -20, -15]], float) + _jitter(rng, 2)
    er = 7 * f()
    eso = grid.tube(eso_pts, er)
    hernia = None
    if "Hiatal hernia" in wanted["esophagus"]:
        hr = float(rng.uniform(15, 20))
        hc = np.array([-10, -20, -5]) + _jitter(rng, 2)
        hernia = (hc, hr)
        eso |= grid.ellipsoid(hc, (hr, hr, hr))
        details["Hiatal hernia"] = {"cm": round(2 * hr / 10, 1)}
    seg[eso] = _ESOPHAGUS
    trachea = grid.tube([[0, 2, 400], [0, 2, 80]], 9 * s)
    seg[trachea] = _TRACHEA
    seg[~body] = 0

    # --- base intensities ---------------------------------------------------------------------------------------
    img = np.full(shape, -1000.0)
    img[body] = -100.0  # subcutaneous fat rim; the inner body is soft tissue
    img[body & inner] = 40.0
    contrast = rng.random() < 0.6
    # Portal-venous enhancement of the abdominal organs when contrast was given (kidneys enhance most).
    organ_hu = {
        _LIVER: (105 if contrast else 60) + rng.normal(0, 4), _SPLEEN: (115 if contrast else 50) + rng.normal(0, 3),
        _KIDNEY_R: 160.0 if contrast else 35.0, _KIDNEY_L: 160.0 if contrast else 35.0,
        _HEART: 40.0, _AORTA: 150.0 if contrast else 45.0, _ESOPHAGUS: 32.0, _TRACHEA: -1000.0,
    }
    lung_hu = -850 + rng.normal(0, 10)
    for label in _VERTEBRAE:
        organ_hu[label] = 250.0  # trabecular bone; calcifications (400-1000 HU) stay brighter
    for label in (_LUL, _LLL, _RUL, _RML, _RLL):
        organ_hu[label] = lung_hu
    lut = np.full(256, np.nan)
    for label, hu in organ_hu.items():
        lut[label] = hu
    hu_of_seg = lut[seg]
    img = np.where(np.isnan(hu_of_seg), img, hu_of_seg)
    heart_mask = seg == _HEART
    img[heart_mask & grid.ellipsoid(heart_c, heart_semi * 0.6)] = 140.0 if contrast else 52.0  # blood pool
    lumen = grid.tube(eso_pts, 2.5) & (seg == _ESOPHAGUS)
    img[lumen] = -900.0

    # --- diseases (painted inside the final masks) ----------------------------------------------------------------
    truth = {a: [] for a in ANATOMIES}
    lung = np.isin(seg, SEG_IDS["lung"])
    occupied = np.zeros(shape, bool)  # dense lung disease, kept away from nodules so that they stay distinct

    if "Emphysema" in wanted["lung"]:
        sides = ["right", "left"] if rng.random() < 0.7 else [str(rng.choice(["right", "left"]))]
        region = np.zeros(shape, bool)
        for side in sides:
            c = lungs[side] + np.array([0, rng.uniform(-15, 15), rng.uniform(15, 30)])
            region |= grid.ellipsoid(c, np.array([40, 55, 42]) * rng.uniform(0.9, 1.1))
        region &= lung
        img[region] = -985.0
        bullae = []
        for _ in range(int(rng.integers(2, 5))):
            c, r = _pick_center(rng, grid, region, float(rng.uniform(8, 15)), 5)
            if c is not None:
                img[grid.ellipsoid(c, (r, r, r)) & region] = -995.0
                bullae.append(r)
        truth["lung"].append("Emphysema")
        details["Emphysema"] = {"sides": sides, "bulla_cm": round(2 * max(bullae, default=8) / 10, 1)}

    if "Consolidation" in wanted["lung"]:
        # Upper and middle lobes only, so that consolidation is not confused with a dependent effusion.
        lobe = int(rng.choice([_RUL, _RML, _LUL]))
        lobe_mask = seg == lobe
        c = grid.world(np.argwhere(lobe_mask).mean(0))
        region = lobe_mask & grid.ellipsoid(c, np.full(3, rng.uniform(40, 55)))
        img[region] = 20.0
        for _ in range(3):  # air bronchograms
            tip = c + rng.normal(0, 30, 3)
            img[grid.tube([c, tip], 3.0) & region] = -900.0
        occupied |= region
        truth["lung"].append("Consolidation")
        details["Consolidation"] = {"lobe": _LOBE_NAMES[lobe]}

    if "Pleural effusion" in wanted["lung"]:
        u = rng.random()
        sides = ["right", "left"] if u < 0.4 else (["right"] if u < 0.7 else ["left"])
        depth = float(rng.uniform(30, 50))
        for side in sides:
            side_mask = np.isin(seg, (_RUL, _RML, _RLL) if side == "right" else (_LUL, _LLL))
            y_post = grid.axes[1][np.nonzero(side_mask.any(axis=(0, 2)))[0][0]]
            region = side_mask & (y < y_post + depth) & (z < lungs[side][2] + 15)
            img[region] = 10.0
            occupied |= region
        truth["lung"].append("Pleural effusion")
        details["Pleural effusion"] = {"sides": sides, "mm": round(depth)}

    if "Lung nodule" in wanted["lung"]:
        placed = []
        free = lung & ~ndimage.binary_dilation(occupied, iterations=2)
        for _ in range(int(rng.integers(2, 4))):
            c, r = _pick_center(rng, grid, free, float(rng.uniform(20, 26)), 15,
                                avoid=[(p, q + 10) for p, q in placed])
            if c is None:
                continue
            ball = grid.ellipsoid(c, (r, r, r)) & lung
            lobe = int(np.bincount(seg[ball]).argmax())
            img[ball] = 30.0
            placed.append((c, r))
            details.setdefault("Lung nodule", {"nodules": []})["nodules"].append(
                {"lobe": _LOBE_NAMES[lobe], "mm": round(2 * r)})
        if placed:
            truth["lung"].append("Lung nodule")

    if "Cardiomegaly" in wanted["heart"]:
        truth["heart"].append("Cardiomegaly")
    if rim:
        img[heart_mask & ~myocardium] = 5.0
        truth["heart"].append("Pericardial effusion")
    if "Coronary artery wall calcification" in wanted["heart"]:
        n = 0
        for _ in range(int(rng.integers(5, 9))):
            # Short curves on the epicardial surface, inside the heart mask.
            d0 = rng.normal(0, 1, 3)
            d0[1] = abs(d0[1])
            d0 /= np.linalg.norm(d0)
            d1 = d0 + rng.normal(0, 0.25, 3)
            d1 /= np.linalg.norm(d1)
            p0, p1 = heart_c + 0.9 * heart_semi * d0, heart_c + 0.9 * heart_semi * d1
            spot = grid.tube([p0, p1], 8.0) & myocardium
            img[spot] = rng.uniform(600, 1000)
            n += int(spot.any())
        if n:
            truth["heart"].append("Coronary artery wall calcification")

    if "Arterial wall calcification" in wanted["aorta"]:
        aorta = seg == _AORTA
        n = 0
        for _ in range(int(rng.integers(6, 12))):
            k = int(rng.integers(1, len(aorta_pts) - 1))
            t = rng.random()
            p = aorta_pts[k] + t * (aorta_pts[k + 1] - aorta_pts[k])
            v = rng.normal(0, 1, 3)
            v /= np.linalg.norm(v)
            plaque = grid.ellipsoid(p + 0.8 * aorta_r[k] * v, (9.0, 9.0, 12.0)) & aorta
            img[plaque] = rng.uniform(600, 1000)
            n += int(plaque.any())
        if n:
            truth["aorta"].append("Arterial wall calcification")

    if hernia is not None:
        hc, hr = hernia
        sac = (seg == _ESOPHAGUS) & grid.ellipsoid(hc, (hr - 3, hr - 3, hr - 3))
        img[sac] = 10.0  # fluid, with an air cap on the non-dependent (anterior) side
        img[sac & (y > hc[1] + rng.uniform(-0.3, 0.2) * hr)] = -950.0
        truth["esophagus"].append("Hiatal hernia")

    liver = seg == _LIVER
    if "Hepatic steatosis" in wanted["liver"]:
        hu = float(rng.uniform(-25, -15))
        img[liver] = hu
        truth["liver"].append("Hepatic steatosis")
        details["Hepatic steatosis"] = {"hu": round(hu)}
    if "Liver lesion" in wanted["liver"]:
        placed = []
        for _ in range(int(rng.integers(2, 4))):
            c, r = _pick_center(rng, grid, liver, float(rng.uniform(22, 30)), 15,
                                avoid=[(p, q + 5) for p, q in placed])
            if c is not None:
                img[grid.ellipsoid(c, (r, r, r)) & liver] = -10.0
                placed.append((c, r))
        if placed:
            truth["liver"].append("Liver lesion")
            details["Liver lesion"] = {"n": len(placed), "cm": round(2 * max(r for _, r in placed) / 10, 1),
                                       "segment": str(rng.choice(["V", "VI", "VII", "VIII", "IVa"]))}

    if "Splenomegaly" in wanted["spleen"]:
        truth["spleen"].append("Splenomegaly")

    if "Renal cyst" in wanted["kidney"]:
        # One or two cysts; the report names the side of the largest.
        cysts = []
        for label in rng.permutation([_KIDNEY_R, _KIDNEY_L])[: int(rng.integers(1, 3))]:
            kidney = seg == label
            c, r = _pick_center(rng, grid, kidney, float(rng.uniform(17, 22)), 12)
            if c is not None:
                img[grid.ellipsoid(c, (r, r, r)) & kidney] = 5.0
                cysts.append((r, int(label)))
        if cysts:
            r, label = max(cysts)
            truth["kidney"].append("Renal cyst")
            details["Renal cyst"] = {"side": "right" if label == _KIDNEY_R else "left", "mm": round(2 * r)}

    img += rng.normal(0.0, _NOISE_HU, shape)
    image = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    truth = {a: sorted(v) for a, v in truth.items()}
    findings, impression = _write_report(rng, truth, details, templates)
    return {"image": image, "seg": seg, "affine": affine, "truth": truth, "findings": findings,
            "impression": impression, "orientation": "LPS" if rng.random() < 0.5 else "RAS", "contrast": contrast,
            "details": details}


# ------------------------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------------------------

_NORMAL = {
    "lung": ["The lungs are clear.", "Both lungs are well aerated without focal consolidation.",
             "The pulmonary parenchyma is unremarkable.", "Lung parenchyma shows normal aeration bilaterally."],
    "heart": ["Heart size is normal.", "The heart is not enlarged.", "Cardiac size is within normal limits.",
              "The heart is normal in size and configuration."],
    "aorta": ["The thoracic aorta is normal in caliber.", "Aortic diameter is within normal limits.",
              "The aorta is of normal calibre without wall calcification."],
    "esophagus": ["The esophagus is unremarkable.", "Esophageal wall thickness is normal.",
                  "The esophagus is normal in course and caliber."],
    "liver": ["The liver is normal in size and attenuation.", "No focal liver lesion is seen.",
              "Liver parenchyma is homogeneous."],
    "spleen": ["The spleen is normal in size.", "Spleen is unremarkable.", "Normal splenic size."],
    "kidney": ["Both kidneys are unremarkable.", "The kidneys are normal in size and attenuation.",
               "No renal lesion is identified."],
}
_ABDOMEN_LIST = ["The liver, spleen and kidneys are unremarkable.",
                 "Liver, spleen, and both kidneys appear normal.",
                 "No abnormality in the liver, spleen or kidneys."]
_NEGATED = {
    "Lung nodule": ["No pulmonary nodules are seen.", "There is no evidence of a lung nodule."],
    "Emphysema": ["No emphysema.", "There are no emphysematous changes in the lungs."],
    "Pleural effusion": ["No pleural effusion.", "There is no pleural effusion or pneumothorax."],
    "Consolidation": ["No consolidation in either lung.", "There is no evidence of pulmonary consolidation."],
    "Cardiomegaly": ["No cardiomegaly."],
    "Pericardial effusion": ["No pericardial effusion.", "There is no evidence of pericardial effusion."],
    "Coronary artery wall calcification": ["No coronary artery calcification is seen."],
    "Hiatal hernia": ["No hiatal hernia."],
    "Arterial wall calcification": ["No aortic wall calcification."],
    "Liver lesion": ["No focal liver lesion."],
    "Hepatic steatosis": ["No hepatic steatosis."],
    "Splenomegaly": ["No splenomegaly."],
    "Renal cyst": ["No renal cyst."],
}


def _side_words(sides):
    return "bilateral" if len(sides) == 2 else sides[0]


def _disease_sentence(rng, disease, det, templates: bool = False) -> tuple[str, str]:
    """(findings sentence, impression phrase) for one present disease. templates: no sentence names a second
    anatomy (the steatosis sentence leaves out its comparison with the spleen), so that a normal anatomy's text is
    its template sentence alone."""
    def pick(options):
        return str(options[int(rng.integers(len(options)))])

    if disease == "Lung nodule":
        nods = sorted(det["nodules"], key=lambda n: -n["mm"])
        big = nods[0]
        if len(nods) == 1:
            text = pick([f"A {big['mm'] / 10:.1f} cm solid nodule is seen in the {big['lobe']}.",
                         f"There is a {big['mm']} mm solid pulmonary nodule in the {big['lobe']}.",
                         (f"Solid nodule measuring {big['mm'] / 10:.1f} cm in the {big['lobe']}, "
                          "suspicious for neoplasm.")])
        else:
            lobes = sorted({n["lobe"] for n in nods})
            text = pick([(f"{len(nods)} solid pulmonary nodules are noted, the largest measuring "
                          f"{big['mm'] / 10:.1f} cm in the {big['lobe']}."),
                         f"Multiple solid nodules in the {' and '.join(lobes)}, up to {big['mm']} mm."])
        return text, pick([f"{big['lobe'].capitalize()} pulmonary nodule.", "Pulmonary nodules, follow-up advised."])
    if disease == "Emphysema":
        where = "both lungs" if len(det["sides"]) == 2 else f"the {det['sides'][0]} lung"
        text = pick([f"Centrilobular emphysema with bullae, predominantly in the upper zone of {where}.",
                     f"Extensive emphysematous changes in {where} with bullae up to {det['bulla_cm']} cm.",
                     f"There are areas of paraseptal and centrilobular emphysema in {where}."])
        return text, pick(["Emphysema.", "Bullous emphysema."])
    if disease == "Pleural effusion":
        side = _side_words(det["sides"])
        if side == "bilateral":
            text = pick([f"Bilateral pleural effusions, up to {det['mm']} mm in thickness.",
                         f"Pleural fluid is seen layering dependently in both hemithoraces, up to {det['mm']} mm."])
        else:
            text = pick([f"{side.capitalize()} pleural effusion with a maximum thickness of {det['mm']} mm.",
                         f"A moderate {side}-sided pleural effusion is present.",
                         f"Pleural fluid is seen layering in the {side} hemithorax ({det['mm']} mm)."])
        return text, f"{side.capitalize()} pleural effusion{'s' if side == 'bilateral' else ''}."
    if disease == "Consolidation":
        lobe = det["lobe"]
        text = pick([f"Consolidation in the {lobe} with air bronchograms, likely pneumonia.",
                     f"There is dense airspace consolidation of the {lobe}, consistent with pneumonia.",
                     f"Lobar consolidation involving the {lobe} containing air bronchograms.",
                     f"Findings suggestive of consolidation in the {lobe}."])
        return text, f"Consolidation in the {lobe}, likely pneumonia."
    if disease == "Cardiomegaly":
        text = pick(["Cardiomegaly.", "The heart is enlarged.",
                     f"Cardiomegaly with a transverse cardiac diameter of {det['diameter_cm']} cm.",
                     "Enlarged heart, cardiothoracic ratio approx. 0.6."])
        return text, "Cardiomegaly."
    if disease == "Pericardial effusion":
        text = pick([f"Pericardial effusion measuring up to {det['mm']} mm.",
                     f"A small pericardial effusion is present, {det['mm']} mm in thickness.",
                     f"There is a circumferential pericardial fluid collection of {det['mm']} mm."])
        return text, "Pericardial effusion."
    if disease == "Coronary artery wall calcification":
        text = pick(["Coronary artery calcifications are present.",
                     "Calcified plaques are seen in the coronary arteries.",
                     ("Atherosclerotic calcification of the coronary arteries, most pronounced in the left "
                      "anterior descending artery.")])
        return text, "Coronary artery calcification."
    if disease == "Arterial wall calcification":
        text = pick(["Calcified atherosclerotic plaques in the aortic wall.",
                     "Atherosclerotic calcifications of the thoracic aorta.",
                     "Mural calcifications are noted along the aortic arch and descending aorta."])
        return text, "Aortic atherosclerotic calcification."
    if disease == "Hiatal hernia":
        text = pick([f"A hiatal hernia is present, measuring {det['cm']} cm.",
                     "Sliding hiatal hernia with an air-fluid level.",
                     f"Moderate hiatus hernia with a {det['cm']} cm intrathoracic component."])
        return text, "Hiatal hernia."
    if disease == "Liver lesion":
        if det["n"] == 1:
            text = pick([f"A {det['cm']} cm hypodense lesion in hepatic segment {det['segment']}, likely a cyst.",
                         (f"Hypoattenuating liver lesion measuring {round(det['cm'] * 10)} mm in segment "
                          f"{det['segment']}.")])
        else:
            text = pick([f"There are {det['n']} hypodense liver lesions, the largest {det['cm']} cm.",
                         f"Multiple hypoattenuating hepatic lesions, up to {det['cm']} cm, possibly cysts."])
        return text, "Hypodense liver lesion."
    if disease == "Hepatic steatosis":
        text = pick(["Diffusely decreased attenuation of the liver, consistent with hepatic steatosis.",
                     f"Fatty infiltration of the liver (approx. {det['hu']} HU).",
                     "The liver is hypodense" + ("" if templates else " relative to the spleen")
                     + ", in keeping with steatosis."])
        return text, "Hepatic steatosis."
    if disease == "Splenomegaly":
        text = pick([f"Splenomegaly, with the spleen measuring {det['length_cm']} cm craniocaudally.",
                     f"The spleen is enlarged ({det['length_cm']} cm).",
                     f"Enlarged spleen measuring {det['length_cm']} cm."])
        return text, "Splenomegaly."
    if disease == "Renal cyst":
        side = det["side"]
        text = pick([f"A {det['mm'] / 10:.1f} cm simple cyst in the {side} kidney.",
                     f"{side.capitalize()} renal cortical cyst measuring {det['mm']} mm.",
                     f"Water-attenuation lesion of the {side} kidney, likely a simple renal cyst."])
        return text, f"{side.capitalize()} renal cyst."
    raise ValueError(disease)


def template_sentence(anatomy: str) -> str:
    """The one sentence that describes a normal anatomy in the template mode (data.demo_templates)."""
    return f"{anatomy.capitalize()} shows no significant abnormalities."


def _templated(items, truth) -> list[tuple[str, str]]:
    """The findings' (anatomy, sentence) items with each normal anatomy's sentences replaced, where its first one
    stood, by its template sentence (the merged "abdomen" sentence by the liver's, spleen's and kidney's)."""
    out, done = [], set()
    for anatomy, sentence in items:
        normal = ["liver", "spleen", "kidney"] if anatomy == "abdomen" else (
            [anatomy] if anatomy in truth and not truth[anatomy] else [])
        if not normal:
            out.append((anatomy, sentence))
        elif anatomy not in done:
            out += [(a, template_sentence(a)) for a in normal]
            done.add(anatomy)
    return out


def _write_report(rng, truth, details, templates: bool = False) -> tuple[str, str]:
    """Findings and impression text consistent with `truth` (varied phrasing, negations, omissions).

    templates: each normal anatomy the findings describe is described by `template_sentence` alone (its negations
    go too); the report's structure (which anatomies it describes, their order) and every random draw stay those of
    the default mode."""
    per_anatomy: dict[str, list[str]] = {}
    impressions = []
    for anatomy in ANATOMIES:
        present = truth[anatomy]
        sentences = []
        for disease in present:
            text, imp = _disease_sentence(rng, disease, details.get(disease, {}), templates)
            sentences.append(text)
            impressions.append(imp)
        if not present:
            if rng.random() < 0.05:  # radiologists sometimes skip a normal organ
                continue
            sentences.append(str(rng.choice(_NORMAL[anatomy])))
        absent = [d for d in DISEASES[anatomy] if d not in present and d in _NEGATED]
        if absent and rng.random() < 0.3:
            sentences.append(str(rng.choice(_NEGATED[str(rng.choice(absent))])))
        per_anatomy[anatomy] = sentences

    abdomen = ["liver", "spleen", "kidney"]
    if all(not truth[a] for a in abdomen) and all(a in per_anatomy for a in abdomen) and rng.random() < 0.35:
        for a in abdomen:
            del per_anatomy[a]
        per_anatomy["abdomen"] = [str(rng.choice(_ABDOMEN_LIST))]
    thorax = [a for a in ("lung", "heart", "aorta", "esophagus") if a in per_anatomy]
    belly = [a for a in ("liver", "spleen", "kidney", "abdomen") if a in per_anatomy]
    rng.shuffle(thorax)
    rng.shuffle(belly)
    extra = ["Trachea and main bronchi are patent.", "No mediastinal lymphadenopathy.",
             "Degenerative changes of the thoracic spine."]
    items = [(a, s) for a in thorax for s in per_anatomy[a]]  # (anatomy, sentence)
    if rng.random() < 0.5:
        items.insert(int(rng.integers(len(items) + 1)), ("", str(rng.choice(extra))))
    items += [(a, s) for a in belly for s in per_anatomy[a]]
    if templates:
        items = _templated(items, truth)
    findings = " ".join(s for _, s in items)
    if impressions:
        if len(impressions) > 1 and rng.random() < 0.5:
            impression = " ".join(f"{i + 1}. {t}" for i, t in enumerate(impressions))
        else:
            impression = " ".join(impressions)
    else:
        impression = str(rng.choice(["No acute cardiopulmonary abnormality.", "No significant abnormality.",
                                     "Unremarkable CT examination."]))
    return findings, impression


# ------------------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------------------

def _storage(case):
    """Image, seg and affine in the order they are stored on disk (LPS-stored scans flip x and y)."""
    image, seg, affine = case["image"], case["seg"], case["affine"].copy()
    if case["orientation"] == "LPS":
        image, seg = image[::-1, ::-1], seg[::-1, ::-1]
        for d in (0, 1):
            affine[d, 3] += affine[d, d] * (image.shape[d] - 1)
            affine[d, d] = -affine[d, d]
    return np.ascontiguousarray(image), np.ascontiguousarray(seg), affine


def _fmt(values) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


def _metadata_row(name, affine, rng):
    """DICOM-style geometry (LPS) for the stored grid: origin and row/column cosines."""
    to_lps = np.diag([-1.0, -1.0, 1.0])
    direction = to_lps @ affine[:3, :3] / np.abs(np.diag(affine[:3, :3]))
    origin = to_lps @ affine[:3, 3]
    return {
        "VolumeName": name,
        "XYSpacing": _fmt([abs(affine[0, 0]), abs(affine[1, 1])]),
        "ZSpacing": f"{abs(affine[2, 2]):g}",
        "RescaleSlope": 1,
        "RescaleIntercept": 0,
        "ImagePositionPatient": _fmt(np.round(origin, 3) + 0.0),
        "ImageOrientationPatient": _fmt(np.concatenate([direction[:, 0], direction[:, 1]]) + 0.0),
        "Manufacturer": str(rng.choice(["SIEMENS", "GE MEDICAL SYSTEMS", "Philips", "TOSHIBA"])),
    }


def _write_csv(path, rows, columns):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def generate_demo_dataset(out_dir: str, *, num_train: int = 480, num_valid: int = 96, num_test: int = 192,
                          seed: int = 0, templates: bool = False, progress: bool = True) -> dict:
    """Writes the demo data set under `out_dir` in CT-RATE layout plus TotalSegmentator masks.

    Returns {"root": out_dir, "splits": {split: number of scans}}. Deterministic given `seed`: each case is
    drawn from its own generator seeded by (seed, split, index), so a case does not depend on the other counts.
    templates: normal anatomies' findings are their template sentences (`generate_case`); every other file is the
    same as without.
    """
    from tqdm import tqdm

    counts = {"train": num_train, "valid": num_valid, "test": num_test}
    for sub in ("radiology_text_reports", "multi_abnormality_labels", "metadata"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    bar = tqdm(total=sum(counts.values()), desc="demo data", disable=not progress)
    for split, n in counts.items():
        table_name, label_name, code = _SPLITS[split]
        seg_dir = os.path.join(out_dir, "segmentations", split)
        os.makedirs(seg_dir, exist_ok=True)
        reports, labels, metadata = [], [], []
        for i in range(1, n + 1):
            rng = np.random.default_rng([seed, code, i])
            case = generate_case(rng, templates)
            name = f"{split}_{i}_a_1.nii.gz"
            scan_dir = os.path.join(out_dir, "dataset", split, f"{split}_{i}", f"{split}_{i}_a")
            os.makedirs(scan_dir, exist_ok=True)
            image, seg, affine = _storage(case)
            for arr, path in ((image, os.path.join(scan_dir, name)), (seg, os.path.join(seg_dir, name))):
                nii = nib.Nifti1Image(arr, affine)
                nii.header.set_xyzt_units("mm")
                nii.to_filename(path)
            reports.append({
                "VolumeName": name,
                "ClinicalInformation_EN": str(rng.choice(["Cough.", "Shortness of breath.", "Chest pain.",
                                                          "Follow-up.", "Fever and cough.", "Not given."])),
                "Technique_EN": ("Contrast-enhanced" if case["contrast"] else "Non-contrast")
                + " axial CT of the chest and upper abdomen.",
                "Findings_EN": case["findings"],
                "Impressions_EN": case["impression"],
            })
            positives = {d for ds in case["truth"].values() for d in ds}
            labels.append({"VolumeName": name, **{c: int(c in positives) for c in CT_RATE_LABELS + EXTRA_LABELS}})
            metadata.append(_metadata_row(name, affine, rng))
            bar.update(1)
        _write_csv(os.path.join(out_dir, "radiology_text_reports", f"{table_name}_reports.csv"), reports,
                   _REPORT_COLUMNS)
        _write_csv(os.path.join(out_dir, "multi_abnormality_labels", f"{label_name}_predicted_labels.csv"), labels,
                   ["VolumeName", *CT_RATE_LABELS, *EXTRA_LABELS])
        _write_csv(os.path.join(out_dir, "metadata", f"{table_name}_metadata.csv"), metadata,
                   _METADATA_COLUMNS)
    bar.close()
    return {"root": out_dir, "splits": counts}
