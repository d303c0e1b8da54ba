"""Tests for the rule-based report decomposition (input_pipeline/report_split.py)."""

import numpy as np
import pytest

from input_pipeline import demo_data as dd
from input_pipeline.report_split import DEFAULT_VOCABULARY, AnatomyText, split_report, split_sentences


def _labels(result):
    return {(a, d) for a, t in result.items() for d in t.diseases}


def test_sentence_splitting_keeps_decimals_abbreviations_and_lists():
    text = ("A 1.5 cm nodule in the right upper lobe. Liver approx. 2.3 cm lesion, e.g. a cyst. "
            "1. Cardiomegaly. 2. Small pericardial effusion! Is there an effusion? Yes")
    assert split_sentences(text) == [
        "A 1.5 cm nodule in the right upper lobe.", "Liver approx. 2.3 cm lesion, e.g. a cyst.", "Cardiomegaly.",
        "Small pericardial effusion!", "Is there an effusion?", "Yes"]
    assert split_sentences("") == []


@pytest.mark.parametrize("findings, expected", [
    ("No pleural effusion.", {"lung": ()}),
    ("There is no evidence of pericardial effusion.", {"heart": ()}),
    ("A small pericardial effusion is present.", {"heart": ("Pericardial effusion",)}),
    ("Bilateral pleural effusions and a pericardial effusion.",
     {"lung": ("Pleural effusion",), "heart": ("Pericardial effusion",)}),
    ("Coronary artery wall calcification.", {"heart": ("Coronary artery wall calcification",)}),
    ("Atherosclerotic calcification of the thoracic aorta; the heart is normal in size.",
     {"aorta": ("Arterial wall calcification",), "heart": ()}),
    ("Calcified plaques in the aortic arch and coronary arteries.",
     {"aorta": ("Arterial wall calcification",), "heart": ("Coronary artery wall calcification",)}),
    ("A 1.5 cm solid nodule in the right upper lobe, without pleural effusion.", {"lung": ("Lung nodule",)}),
    ("No pleural effusion, but consolidation in the left lower lobe is likely.", {"lung": ("Consolidation",)}),
    ("Findings suggestive of emphysema in both lungs.", {"lung": ("Emphysema",)}),
    ("Pneumonia in the right lower lobe cannot be excluded.", {"lung": ("Consolidation",)}),
    ("Pleural effusion is not seen.", {"lung": ()}),
    ("The lungs are negative for nodules or consolidation.", {"lung": ()}),
    ("The liver, spleen and kidneys are unremarkable.", {"liver": (), "spleen": (), "kidney": ()}),
    ("The heart is not enlarged. The spleen is enlarged (15.5 cm).", {"heart": (), "spleen": ("Splenomegaly",)}),
    ("Simple cysts in the liver and the left kidney.", {"liver": ("Liver lesion",), "kidney": ("Renal cyst",)}),
    ("A 2 cm hypodense lesion in the liver; the kidneys are free of cysts.",
     {"liver": ("Liver lesion",), "kidney": ()}),
    ("Fatty infiltration of the liver. Sliding hiatal hernia.",
     {"liver": ("Hepatic steatosis",), "esophagus": ("Hiatal hernia",)}),
    ("No mediastinal lymphadenopathy. Pacemaker leads in the right ventricle.",
     {"mediastinum": ("Medical material",), "heart": ()}),
    ("Degenerative changes of the spine.", {}),
])
def test_hand_written_sentences(findings, expected):
    result = split_report(findings, "")
    assert {a: t.diseases for a, t in result.items()} == expected
    for t in result.values():
        assert t.normal == (not t.diseases)


def test_texts_findings_then_impression_deduplicated():
    result = split_report("The heart is enlarged. The lungs are clear.", "Cardiomegaly. The lungs are clear.")
    assert result["heart"] == AnatomyText("The heart is enlarged. Cardiomegaly.", False, ("Cardiomegaly",))
    assert result["lung"] == AnatomyText("The lungs are clear.", True, ())


def test_vocabulary_covers_ct_rate_and_demo_labels():
    covered = {d for diseases in DEFAULT_VOCABULARY.values() for d in diseases}
    assert set(dd.CT_RATE_LABELS) | set(dd.EXTRA_LABELS) <= covered
    for anatomy, diseases in dd.DISEASES.items():
        assert set(diseases) <= set(DEFAULT_VOCABULARY[anatomy])


@pytest.mark.slow
def test_generated_reports_recover_truth_exactly():
    for i in range(200):
        case = dd.generate_case(np.random.default_rng([7, 1, i]))
        result = split_report(case["findings"], case["impression"])
        truth = {(a, d) for a, ds in case["truth"].items() for d in ds}
        assert _labels(result) == truth, (case["findings"], case["impression"])
        for anatomy, diseases in case["truth"].items():
            if diseases:
                assert not result[anatomy].normal
