"""Label config parsing: realistic LS configs, per-label prompts, TextArea binding, precise errors."""

from __future__ import annotations

import pytest

from backend.errors import ConfigError
from backend.label_config import BrushTarget, parse

E2E_CONFIG = """
<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Object" background="#FF0000"/>
  </BrushLabels>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1"/>
  <Text name="text" value="$text"/>
</View>
"""

MULTI_CONFIG = """<View>
  <Header value="Street scene"/>
  <View style="display: flex">
    <Image name="left" value="$left_url"/>
    <Image name="right" value="$right_url"/>
  </View>
  <BrushLabels name="vehicles" toName="left, right">
    <Label value="Car" prompt="a car|an automobile" predicted_values="car, sedan"/>
    <Label value="Traffic light" hotkey="t"/>
  </BrushLabels>
  <Brush name="scribble" toName="right"/>
  <TextArea name="ask_left" toName="left"/>
  <TextArea name="ask_both" toName="left,right"/>
  <Choices name="weather" toName="left"><Choice value="sunny"/></Choices>
</View>"""


def test_e2e_config() -> None:
    config = parse(E2E_CONFIG)
    assert config.targets == [BrushTarget(from_name="tag", to_name="image", value_key="image",
                                          control_type="brushlabels", labels=["Object"], label_prompts={},
                                          textareas=["prompt"])]


def test_several_images_controls_and_textareas() -> None:
    config = parse(MULTI_CONFIG)
    pairs = [(t.from_name, t.to_name, t.value_key, t.control_type) for t in config.targets]
    assert pairs == [("vehicles", "left", "left_url", "brushlabels"), ("vehicles", "right", "right_url", "brushlabels"),
                     ("scribble", "right", "right_url", "brush")]
    vehicles_left = config.target("vehicles", "left")
    assert vehicles_left.labels == ["Car", "Traffic light"]
    assert vehicles_left.label_prompts == {"Car": ["a car", "an automobile", "car", "sedan"]}
    assert vehicles_left.textareas == ["ask_left", "ask_both"]
    assert config.target("vehicles", "right").textareas == ["ask_both"]
    scribble = config.target("scribble")
    assert scribble.labels == [] and scribble.label_prompts == {} and scribble.textareas == ["ask_both"]
    with pytest.raises(KeyError):
        config.target("missing")


def test_prompt_attribute_keeps_commas_and_normalises_whitespace() -> None:
    config = parse('<View><Image name="i" value="$img"/><BrushLabels name="b" toName="i">'
                   '<Label value="Dog" prompt="  the dog,   sitting | a  puppy "/></BrushLabels></View>')
    assert config.targets[0].label_prompts == {"Dog": ["the dog, sitting", "a puppy"]}


def test_ls_semantic_segmentation_template_with_comments() -> None:
    config = parse("""<View>
  <!-- LS template "Semantic Segmentation with Masks" -->
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Airplane" background="rgba(255, 0, 0, 0.7)"/>
    <Label value="Car" background="rgba(0, 0, 255, 0.7)"/>
  </BrushLabels>
</View>""")
    assert [(t.from_name, t.to_name, t.value_key, t.labels) for t in config.targets] == [
        ("tag", "image", "image", ["Airplane", "Car"])]


def test_tag_names_are_case_insensitive() -> None:
    config = parse('<view><image name="i" value="$img"/><brushlabels name="b" toName="i">'
                   '<label value="A"/></brushlabels></view>')
    assert config.targets[0].labels == ["A"]


@pytest.mark.parametrize("xml,message", [
    ("", "empty"),
    ("<View><Image name='i' value='$x'>", "not valid XML"),
    ('<View><Image name="image" value="$image"/><RectangleLabels name="r" toName="image"><Label value="A"/>'
     "</RectangleLabels></View>", "no <BrushLabels> or <Brush>"),
    ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="img"><Label value="A"/>'
     "</BrushLabels></View>", 'toName="img", but there is no <Image> with that name (images: image)'),
    ('<View><Image name="image"/><BrushLabels name="tag" toName="image"><Label value="A"/></BrushLabels></View>',
     '<Image name="image"> has no value attribute'),
    ('<View><Image name="image" valueList="$images"/><BrushLabels name="tag" toName="image"><Label value="A"/>'
     "</BrushLabels></View>", "valueList"),
    ('<View><Image name="image" value="http://x/a.png"/><BrushLabels name="tag" toName="image"><Label value="A"/>'
     "</BrushLabels></View>", 'must name a task data field, like "$image"'),
    ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image"></BrushLabels></View>',
     'BrushLabels name="tag"> has no <Label value="..."> children'),
    ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image"><Label value="A"/>'
     '<Label value="A"/></BrushLabels></View>', 'lists the label "A" twice'),
    ('<View><Image name="image" value="$image"/><BrushLabels name="tag"><Label value="A"/></BrushLabels></View>',
     "has no toName"),
    ('<View><Image name="image" value="$image"/><BrushLabels toName="image"><Label value="A"/></BrushLabels></View>',
     "has no name attribute"),
    ('<View><Image name="i" value="$a"/><Image name="i" value="$b"/><Brush name="b" toName="i"/></View>',
     'two <Image> tags are named "i"'),
])
def test_unservable_configs_raise_precise_errors(xml: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(xml)
    assert message in info.value.message
    assert (info.value.status, info.value.code, info.value.field) == (422, "bad_label_config", "label_config")


def test_entity_expansion_is_refused() -> None:
    bomb = ('<?xml version="1.0"?><!DOCTYPE v [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
            '<View><Image name="i" value="$img"/><BrushLabels name="t" toName="i"><Label value="&b;"/>'
            "</BrushLabels></View>")
    with pytest.raises(ConfigError, match="forbidden XML features"):
        parse(bomb)
    external = ('<?xml version="1.0"?><!DOCTYPE v [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                '<View><Image name="i" value="$img"/><Brush name="t" toName="i"/><Header value="&x;"/></View>')
    with pytest.raises(ConfigError, match="forbidden XML features"):
        parse(external)
