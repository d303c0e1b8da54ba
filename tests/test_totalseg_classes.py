"""The bundled TotalSegmentator class tables equal TotalSegmentator's own (../shared/data)."""

import json

from input_pipeline.totalseg_classes import CLASS_TABLES


def test_class_tables_match_totalsegmentator(shared_data):
    ref = json.loads((shared_data / "totalsegmentator_classes.json").read_text())
    for version in ("total", "total_v1"):
        assert CLASS_TABLES[version] == {int(k): v for k, v in ref[version].items()}
    assert len(CLASS_TABLES["total"]) == 117 and len(CLASS_TABLES["total_v1"]) == 104
