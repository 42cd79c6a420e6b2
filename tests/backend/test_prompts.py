"""Prompt resolution: each rule of ARCHITECTURE §4, their precedence, label assignment, validation, hashing."""

from __future__ import annotations

from typing import Any

import pytest

from backend.errors import PromptError
from backend.label_config import parse
from backend.prompts import PromptRequest, prompt_set_hash, resolve

CONFIG = parse("""<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Car" prompt="a car|an automobile"/>
    <Label value="Traffic_light"/>
    <Label value="Person" predicted_values="pedestrian, cyclist"/>
  </BrushLabels>
  <TextArea name="prompt" toName="image"/>
  <Image name="other" value="$other"/>
  <TextArea name="other_prompt" toName="other"/>
  <Brush name="free" toName="other"/>
</View>""")
TAG = CONFIG.target("tag")
FREE = CONFIG.target("free")


def _context(*texts: Any, from_name: str = "prompt", to_name: str = "image") -> dict[str, Any]:
    return {"annotation_id": None, "draft_id": 0, "user_id": 1,
            "result": [{"from_name": "kp", "to_name": to_name, "type": "keypointlabels", "value": {"x": 1, "y": 2}},
                       {"from_name": from_name, "to_name": to_name, "type": "textarea",
                        "value": {"text": list(texts)}}]}


def _task(prompt: Any = None) -> dict[str, Any]:
    data: dict[str, Any] = {"image": "/data/upload/1/a.png"}
    if prompt is not None:
        data["prompt"] = prompt
    return {"id": 7, "data": data}


def pairs(requests: list[PromptRequest]) -> list[tuple[str, str, str]]:
    return [(r.prompt, r.label, r.source) for r in requests]


# --- rule 4 and 3: labels and per-label prompts ------------------------------------------------------------------

def test_labels_and_config_prompts_without_anything_else() -> None:
    assert pairs(resolve(_task(), TAG, context=None, extra_params=None)) == [
        ("a car", "Car", "config"), ("an automobile", "Car", "config"), ("traffic light", "Traffic_light", "label"),
        ("pedestrian", "Person", "config"), ("cyclist", "Person", "config")]


def test_extra_params_override_config_per_label() -> None:
    extra = {"prompts": {"car": "the red car", "Traffic_light": ["traffic light", "signal"]}}
    assert pairs(resolve(_task(), TAG, context=None, extra_params=extra)) == [
        ("the red car", "Car", "extra_params"), ("traffic light", "Traffic_light", "extra_params"),
        ("signal", "Traffic_light", "extra_params"), ("pedestrian", "Person", "config"),
        ("cyclist", "Person", "config")]


def test_extra_params_scoped_to_a_control() -> None:
    extra = {"prompts": {"tag": {"Person": "a human"}, "some_other_control": {"Tree": "a tree"}}}
    requests = resolve(_task(), TAG, context=None, extra_params=extra)
    assert ("a human", "Person", "extra_params") in pairs(requests)


def test_extra_params_unknown_label_names_it_and_the_valid_ones() -> None:
    with pytest.raises(PromptError) as info:
        resolve(_task(), TAG, context=None, extra_params={"prompts": {"Bus": "a bus"}})
    message = info.value.message
    assert "'Bus'" in message and "Car, Traffic_light, Person" in message and "control name" in message
    assert info.value.field == "extra_params.prompts.Bus"


def test_extra_params_prompts_must_be_a_mapping() -> None:
    with pytest.raises(PromptError, match="must be a mapping"):
        resolve(_task(), TAG, context=None, extra_params={"prompts": ["a car"]})


# --- rule 2: task data field ---------------------------------------------------------------------------------------

def test_task_string_beats_label_prompts_and_gets_the_first_label() -> None:
    assert pairs(resolve(_task("  the   blue\tvan "), TAG, context=None, extra_params={"prompts": {"Car": "x"}})) == [
        ("the blue van", "Car", "task")]


def test_task_string_with_label_prefix_or_matching_a_label() -> None:
    assert pairs(resolve(_task("person: the man in red"), TAG, context=None, extra_params=None)) == [
        ("the man in red", "Person", "task")]
    assert pairs(resolve(_task("Traffic_light"), TAG, context=None, extra_params=None)) == [
        ("Traffic_light", "Traffic_light", "task")]
    assert pairs(resolve(_task("cyclist"), TAG, context=None, extra_params=None)) == [("cyclist", "Person", "task")]
    assert pairs(resolve(_task("note: the red car"), TAG, context=None, extra_params=None)) == [
        ("note: the red car", "Car", "task")]


def test_task_list_and_mapping() -> None:
    assert pairs(resolve(_task(["the dog", "Person: a girl", "the dog"]), TAG, context=None, extra_params=None)) == [
        ("the dog", "Car", "task"), ("a girl", "Person", "task")]
    mapping = {"Person": ["the man", "the woman"], "car": "the taxi"}
    assert pairs(resolve(_task(mapping), TAG, context=None, extra_params=None)) == [
        ("the man", "Person", "task"), ("the woman", "Person", "task"), ("the taxi", "Car", "task")]


def test_custom_prompt_field() -> None:
    task = {"id": 1, "data": {"image": "x", "text": "a white ellipse", "prompt": "ignored"}}
    assert pairs(resolve(task, TAG, context=None, extra_params=None, prompt_field="text")) == [
        ("a white ellipse", "Car", "task")]


@pytest.mark.parametrize("blank", [None, "", "   ", [], {}])
def test_blank_task_field_falls_through(blank: Any) -> None:
    task = {"id": 1, "data": {"image": "x", "prompt": blank}}
    assert {r.source for r in resolve(task, TAG, context=None, extra_params=None)} == {"config", "label"}


@pytest.mark.parametrize("value,message,field", [
    (42, "data.prompt must be text, not int", "data.prompt"),
    (["ok", None], "data.prompt[1] must be text, not NoneType", "data.prompt[1]"),
    (["ok", "  "], "data.prompt[1] is an empty prompt", "data.prompt[1]"),
    ({"Bus": "a bus"}, "names the label 'Bus', which is not a label of <BrushLabels name=\"tag\"> "
                       "(labels: Car, Traffic_light, Person)", "data.prompt.Bus"),
    ({"Car": []}, "data.prompt.Car is an empty list", "data.prompt.Car"),
    ({"Car": ["fine", 3]}, "must be text, not int", "data.prompt.Car"),
    ("x" * 301, "prompt of 301 characters is longer than the limit of 300", "data.prompt"),
])
def test_bad_task_prompts(value: Any, message: str, field: str) -> None:
    with pytest.raises(PromptError) as info:
        resolve(_task(value), TAG, context=None, extra_params=None)
    assert message in info.value.message
    assert info.value.field == field and info.value.status == 422


def test_max_length_is_configurable() -> None:
    assert resolve(_task("x" * 301), TAG, context=None, extra_params=None, max_length=400)[0].prompt == "x" * 301
    with pytest.raises(PromptError, match="longer than the limit of 5"):
        resolve(_task("abcdef"), TAG, context=None, extra_params=None, max_length=5)


# --- rule 1: interactive context -----------------------------------------------------------------------------------

def test_context_beats_task_field() -> None:
    requests = resolve(_task("the taxi"), TAG, context=_context("brown cat", "Person: the kid\nthe dog"),
                       extra_params=None)
    assert pairs(requests) == [("brown cat", "Car", "context"), ("the kid", "Person", "context"),
                               ("the dog", "Car", "context")]


def test_context_for_another_image_or_blank_is_ignored() -> None:
    other = _context("a tree", from_name="other_prompt", to_name="other")
    assert {r.source for r in resolve(_task("the taxi"), TAG, context=other, extra_params=None)} == {"task"}
    blank = _context("  ")
    assert {r.source for r in resolve(_task("the taxi"), TAG, context=blank, extra_params=None)} == {"task"}
    assert pairs(resolve(_task(), FREE, context=other, extra_params=None)) == [("a tree", "", "context")]


def test_context_non_text_is_refused() -> None:
    with pytest.raises(PromptError, match=r"context.result\[1\].value.text\[0\] must be text"):
        resolve(_task(), TAG, context=_context(5), extra_params=None)


# --- plain <Brush> (no labels) ----------------------------------------------------------------------------------------

def test_brush_without_labels() -> None:
    assert pairs(resolve({"data": {"prompt": ["a", "b: c"]}}, FREE, context=None, extra_params=None)) == [
        ("a", "", "task"), ("b: c", "", "task")]
    assert resolve({"data": {}}, FREE, context=None, extra_params={"prompts": {"Car": "x"}}) == []
    with pytest.raises(PromptError, match="has no labels"):
        resolve({"data": {"prompt": {"Car": "x"}}}, FREE, context=None, extra_params=None)


# --- prompt_set_hash -------------------------------------------------------------------------------------------

def test_prompt_set_hash_is_deterministic_and_sensitive() -> None:
    base = prompt_set_hash(CONFIG.targets, {"prompts": {"Car": "x", "Person": "y"}}, mask_mode="semantic")
    assert base == prompt_set_hash(CONFIG.targets, {"prompts": {"Person": "y", "Car": "x"}}, mask_mode="semantic")
    assert len(base) == 64 and int(base, 16) >= 0
    assert base != prompt_set_hash(CONFIG.targets, {"prompts": {"Car": "z", "Person": "y"}}, mask_mode="semantic")
    assert base != prompt_set_hash(CONFIG.targets, {"prompts": {"Car": "x", "Person": "y"}}, mask_mode="instances")
    assert base != prompt_set_hash(CONFIG.targets[:1], {"prompts": {"Car": "x", "Person": "y"}}, mask_mode="semantic")
