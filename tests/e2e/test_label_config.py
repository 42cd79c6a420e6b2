"""The shipped label_config.xml is accepted by a real Label Studio and reads the same in LS and in our parser."""

from __future__ import annotations

import pytest

from backend.label_config import parse
from evf_sam.data.scenes import SHAPES
from scripts.ls_harness import LabelStudioClient, LabelStudioError

pytestmark = pytest.mark.e2e


def test_label_studio_validates_the_config(ls: LabelStudioClient, label_config: str) -> None:
    ls.validate_config(label_config)


def test_label_studio_rejects_a_broken_config(ls: LabelStudioClient) -> None:
    broken = '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="img"><Label value="A"/>' \
             '</BrushLabels></View>'
    with pytest.raises(LabelStudioError, match="toName=.*img.* not found"):
        ls.validate_config(broken)


def test_project_from_config_round_trips(ls: LabelStudioClient, label_config: str) -> None:
    created = ls.create_project("label config round trip", label_config)
    stored = ls.project(created["id"])
    assert stored["label_config"].strip() == label_config.strip()

    ours = parse(stored["label_config"]).targets[0]
    theirs = stored["parsed_label_config"]
    assert theirs[ours.from_name]["type"] == "BrushLabels"
    assert theirs[ours.from_name]["to_name"] == [ours.to_name]
    assert theirs[ours.from_name]["labels"] == ours.labels
    for label, attrs in theirs[ours.from_name]["labels_attrs"].items():
        assert attrs["prompt"] in ours.label_prompts[label]
    assert {shape.capitalize() for shape in SHAPES} | {"Person", "Car"} <= set(ours.labels)  # demo data + everyday
    assert theirs["prompt"] == {**theirs["prompt"], "type": "TextArea", "to_name": [ours.to_name]}
    assert ours.textareas == ["prompt"]
