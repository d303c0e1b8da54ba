"""Report decompositions made elsewhere: fVLM's JSON files, RadGenome-ChestCT's region CSV and a generic JSONL give
the same tables (tiny fabricated files with the real file, column and key names; no TensorFlow)."""

import csv
import json
import logging

import pytest

from input_pipeline import sources

ANATOMIES = ["lung", "heart", "esophagus", "aorta", "trachea"]


def _fvlm(tmp_path, desc, conc):
    d = tmp_path / "fvlm"
    d.mkdir()
    (d / "desc_info.json").write_text(json.dumps(desc))
    (d / "conc_info.json").write_text(json.dumps(conc))
    return sources.load_decomposition(str(d), ANATOMIES)


def _csv(path, rows, header=sources.RADGENOME_COLUMNS):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def test_radgenome_matches_fvlm_and_maps_regions(tmp_path, caplog):
    path = _csv(tmp_path / "train_region_report.csv", [
        ("train_1_a_1.nii.gz", "", "Whole-report sentence."),
        ("train_1_a_1.nii.gz", "lung", "Centrilobular emphysema."),
        ("train_1_a_1.nii.gz", "left lung", "Nodule of 6 mm in the left upper lobe."),
        ("train_1_a_1.nii.gz", "right lung upper lobe", "No consolidation."),
        ("train_1_a_1.nii.gz", "heart", "Heart size is normal."),
        ("train_1_a_1.nii.gz", "trachea and bronchie", "Trachea is patent."),
        ("train_1_a_1.nii.gz", "bone", "Degenerative changes."),
        ("train_1_a_1.nii.gz", "thyroid", "Thyroid is normal."),
        # the second reconstruction of the same scan repeats the report's sentences
        ("train_1_a_2.nii.gz", "lung", "Centrilobular emphysema."),
        ("valid_3_b_1.nii.gz", "Aorta", "Aortic calcification."),
    ])
    with caplog.at_level(logging.INFO, logger="input_pipeline.sources"):
        got = sources.load_decomposition(path, ANATOMIES)
    want = _fvlm(tmp_path, {
        "train_1_a": {"lung": "Centrilobular emphysema. Nodule of 6 mm in the left upper lobe. No consolidation.",
                      "heart": "Heart size is normal.", "trachea": "Trachea is patent."},
        "valid_3_b": {"aorta": "Aortic calcification."}}, {})
    assert got == want
    assert "3 rows ignored" in caplog.text and "'bone' 1" in caplog.text and "'(none)' 1" in caplog.text
    # Downstream is unchanged: the volume finds its scan's texts, labelled the same way.
    a = sources.decomposed_texts("train_1_a_2", *got, ANATOMIES)
    b = sources.decomposed_texts("train_1_a_2", *want, ANATOMIES)
    assert a == b and set(a) == {"lung", "heart", "trachea"} and not a["lung"].normal and a["heart"].normal


def test_region_anatomies_whole_words():
    assert sources.region_anatomies("right lung upper lobe", ANATOMIES) == ["lung"]
    assert sources.region_anatomies("Trachea and bronchie", ANATOMIES) == ["trachea"]
    assert sources.region_anatomies("lungs", ANATOMIES) == []  # a word, not a prefix
    assert sources.region_anatomies("mediastinum", ANATOMIES) == []


def test_jsonl_matches_fvlm(tmp_path, caplog):
    lines = [{"id": "train_1_a_1", "anatomy": "lung", "text": "Centrilobular emphysema.", "abnormal": False},
             {"id": "train_1_a_1", "anatomy": "lung", "text": "Pleural effusion on the right.", "abnormal": True},
             {"id": "train_1_a", "anatomy": "heart", "text": "Heart size   is normal.", "abnormal": False},
             {"id": "patient7", "anatomy": "aorta", "text": "Aortic calcification.", "abnormal": True},
             {"id": "patient7", "anatomy": "brain", "text": "Not in the configuration.", "abnormal": False}]
    path = tmp_path / "dec.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    with caplog.at_level(logging.INFO, logger="input_pipeline.sources"):
        got = sources.load_decomposition(str(path), ANATOMIES)
    want = _fvlm(tmp_path, {"train_1_a": {"lung": "Centrilobular emphysema.", "heart": "Heart size is normal."}},
                 {"train_1_a": {"lung": "Pleural effusion on the right."},
                  "patient7": {"aorta": "Aortic calcification."}})
    assert got[:2] == want[:2] and want[2] == {}
    # The flags: an anatomy is abnormal when any of its lines is.
    assert got[2] == {"train_1_a": {"lung": True, "heart": False}, "patient7": {"aorta": True}}
    assert "1 rows ignored" in caplog.text and "'brain' 1" in caplog.text
    parts = sources.decomposed_texts("train_1_a_1", *got, ANATOMIES)
    assert parts["lung"].text == "Centrilobular emphysema. Pleural effusion on the right." and not parts["lung"].normal


def test_jsonl_abnormal_flag_sets_normal(tmp_path):
    """The JSONL's `abnormal` decides the normal flag, over the vocabulary: a text with a disease trigger flagged
    false is normal, one with none flagged true is abnormal; without the flags the vocabulary decides."""
    lines = [{"id": "s1", "anatomy": "lung", "text": "Emphysema in both upper lobes.", "abnormal": False},
             {"id": "s1", "anatomy": "heart", "text": "The heart looks unusual.", "abnormal": True},
             {"id": "s1", "anatomy": "aorta", "text": "Aortic calcification.", "abnormal": True}]
    path = tmp_path / "dec.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    findings, impression, flags = sources.load_decomposition(str(path), ANATOMIES)
    parts = sources.decomposed_texts("s1", findings, impression, flags, ANATOMIES)
    assert {a: t.normal for a, t in parts.items()} == {"lung": True, "heart": False, "aorta": False}
    assert parts["lung"].diseases == ("Emphysema",)  # the labels stay the vocabulary's
    by_vocabulary = sources.decomposed_texts("s1", findings, impression, {}, ANATOMIES)
    assert {a: t.normal for a, t in by_vocabulary.items()} == {"lung": False, "heart": True, "aorta": False}


def test_folder_of_csv_and_jsonl_is_merged(tmp_path):
    _csv(tmp_path / "train.csv", [("train_1_a_1.nii.gz", "heart", "Heart size is normal.")])
    _csv(tmp_path / "valid.csv", [("valid_2_a_1.nii.gz", "lung", "No nodules.")])
    (tmp_path / "extra.jsonl").write_text(json.dumps(
        {"id": "train_1_a", "anatomy": "heart", "text": "Pericardial effusion.", "abnormal": True}) + "\n")
    findings, impression, flags = sources.load_decomposition(str(tmp_path), ANATOMIES)
    assert findings == {"train_1_a": {"heart": "Heart size is normal."}, "valid_2_a": {"lung": "No nodules."}}
    assert impression == {"train_1_a": {"heart": "Pericardial effusion."}}
    assert flags == {"train_1_a": {"heart": True}}  # only the JSONL states flags


def test_fvlm_folder_unchanged(tmp_path):
    desc, conc = {"train_1_a": {"lung": "Emphysema.", "brain": "kept as published"}}, {}
    assert _fvlm(tmp_path, desc, conc) == (desc, conc, {})
    (tmp_path / "fvlm" / "desc_info.json").unlink()
    assert sources.load_decomposition(str(tmp_path / "fvlm"), ANATOMIES) == ({}, {}, {})


@pytest.mark.parametrize("content, message", [
    ("Volumename,Anatomy\ntrain_1_a_1.nii.gz,lung\n", "line 1: no column Sentence"),
    ("Volumename,Anatomy,Sentence\ntrain_1_a_1.nii.gz,lung,Fine.\n,lung,No volume.\n", "line 3: empty Volumename"),
])
def test_bad_csv(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as e:
        sources.load_decomposition(str(path), ANATOMIES)
    assert "bad.csv" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "anatomy": "lung", "text": "x"}', "line 2: no key abnormal"),
    ('{"id": "a", "anatomy": "lung", "text": "x", "abnormal": "yes"}', "line 2: abnormal must be true or false"),
    ('{"id": "a", "anatomy": "lung", "text": "x", "abnormal": tru', "line 2: not valid JSON"),
    ('["a", "lung"]', "line 2: not a JSON object"),
    ('{"id": "", "anatomy": "lung", "text": "x", "abnormal": true}', "line 2: id must be"),
])
def test_bad_jsonl(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "a", "anatomy": "lung", "text": "Fine.", "abnormal": False}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as e:
        sources.load_decomposition(str(path), ANATOMIES)
    assert "bad.jsonl" in str(e.value) and "\n" not in str(e.value)


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither of"):
        sources.load_decomposition(str(tmp_path), ANATOMIES)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.load_decomposition(str(tmp_path / "nowhere"), ANATOMIES)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="expected a folder"):
        sources.load_decomposition(str(tmp_path / "notes.txt"), ANATOMIES)
    (tmp_path / "desc_info.json").write_text("{}")
    _csv(tmp_path / "regions.csv", [])
    with pytest.raises(ValueError, match="holds both"):
        sources.load_decomposition(str(tmp_path), ANATOMIES)
