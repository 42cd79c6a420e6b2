"""Label Studio label config → what the backend predicts: one `BrushTarget` per (brush control, image) pair.

Understood tags (case-insensitive): `<Image name value="$key">`, `<BrushLabels name toName>` with `<Label value>`
children, plain `<Brush name toName>` (unlabelled brush regions), and `<TextArea name toName>` bound to an image
(interactive text prompts). `toName` may list several images, comma-separated; each pair is its own target.

Per-label prompts on `<Label>`: `prompt="the red car|a red vehicle"` (alternatives separated by `|`; a prompt may
contain commas) and the SDK's `predicted_values="car, truck"` (separated by commas or `|`).

The XML is parsed with defusedxml: entity declarations and external references are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from xml.etree.ElementTree import Element, ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from backend.errors import ConfigError

_VARIABLE = re.compile(r"^\$([A-Za-z_][\w.-]*)$")
_FIELD = "label_config"


@dataclass(frozen=True)
class BrushTarget:
    """One brush control drawing on one image.

    `control_type` is the LS result type ("brushlabels" or "brush"); `labels` are the `<Label>` values in config order
    (empty for a plain `<Brush>`); `label_prompts` maps labels to prompts from their attributes; `textareas` are the
    names of `<TextArea>` controls bound to this image.
    """

    from_name: str
    to_name: str
    value_key: str
    control_type: str
    labels: list[str] = field(default_factory=list)
    label_prompts: dict[str, list[str]] = field(default_factory=dict)
    textareas: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LabelConfig:
    """A parsed label config: the brush targets in config order."""

    targets: list[BrushTarget]

    def target(self, from_name: str, to_name: str | None = None) -> BrushTarget:
        """The target of control `from_name` (and image `to_name` when it draws on several); KeyError if none."""
        for target in self.targets:
            if target.from_name == from_name and (to_name is None or target.to_name == to_name):
                return target
        raise KeyError(f"no brush target {from_name!r}" + (f" on {to_name!r}" if to_name else ""))


def parse(xml: str) -> LabelConfig:
    """Parse an LS label config; raises ConfigError naming the problem when the backend cannot serve it."""
    if not isinstance(xml, str) or not xml.strip():
        raise ConfigError("the label config is empty", field=_FIELD)
    try:
        root = fromstring(xml)
    except DefusedXmlException as error:
        raise ConfigError(f"the label config uses forbidden XML features ({error})", field=_FIELD) from None
    except ParseError as error:
        raise ConfigError(f"the label config is not valid XML: {error}", field=_FIELD) from None

    elements = list(root.iter())
    images = _images(elements)
    textareas = [(_name(e, "TextArea"), _to_names(e)) for e in elements if _tag(e) == "textarea" and e.get("toName")]
    targets: list[BrushTarget] = []
    for element in elements:
        kind = _tag(element)
        if kind not in ("brushlabels", "brush"):
            continue
        name = _name(element, element.tag)
        labels, prompts = _labels(element, name) if kind == "brushlabels" else ([], {})
        for to_name in _to_names(element):
            if to_name not in images:
                known = ", ".join(sorted(images)) or "none"
                raise ConfigError(f'<{element.tag} name="{name}"> points to toName="{to_name}", but there is no '
                                  f"<Image> with that name (images: {known})", field=_FIELD)
            targets.append(BrushTarget(
                from_name=name, to_name=to_name, value_key=images[to_name], control_type=kind, labels=labels,
                label_prompts=prompts, textareas=[t for t, names in textareas if to_name in names]))
    if not targets:
        raise ConfigError("the label config has no <BrushLabels> or <Brush> control bound to an <Image>; "
                          "this backend predicts brush masks only", field=_FIELD)
    return LabelConfig(targets=targets)


def _tag(element: Element) -> str:
    return element.tag.lower() if isinstance(element.tag, str) else ""


def _name(element: Element, tag: str) -> str:
    name = (element.get("name") or "").strip()
    if not name:
        raise ConfigError(f"a <{tag}> tag has no name attribute", field=_FIELD)
    return name


def _to_names(element: Element) -> list[str]:
    names = [n.strip() for n in (element.get("toName") or "").split(",") if n.strip()]
    if not names:
        raise ConfigError(f'<{element.tag} name="{element.get("name")}"> has no toName attribute', field=_FIELD)
    return names


def _images(elements: list[Element]) -> dict[str, str]:
    """Image name → task data key."""
    images: dict[str, str] = {}
    for element in elements:
        if _tag(element) != "image":
            continue
        name = _name(element, "Image")
        if name in images:
            raise ConfigError(f'two <Image> tags are named "{name}"', field=_FIELD)
        value = (element.get("value") or "").strip()
        if not value:
            hint = " (valueList, i.e. several images per task, is not supported)" if element.get("valueList") else ""
            raise ConfigError(f'<Image name="{name}"> has no value attribute{hint}; use value="$image" to name '
                              "the task data field holding the image URL", field=_FIELD)
        match = _VARIABLE.match(value)
        if not match:
            raise ConfigError(f'<Image name="{name}"> value="{value}" must name a task data field, like "$image"',
                              field=_FIELD)
        images[name] = match.group(1)
    return images


def _labels(control: Element, name: str) -> tuple[list[str], dict[str, list[str]]]:
    labels: list[str] = []
    prompts: dict[str, list[str]] = {}
    for element in control.iter():
        if _tag(element) != "label":
            continue
        value = element.get("value")
        if value is None or not value.strip():
            raise ConfigError(f'a <Label> under <BrushLabels name="{name}"> has no value', field=_FIELD)
        if value in labels:
            raise ConfigError(f'<BrushLabels name="{name}"> lists the label "{value}" twice', field=_FIELD)
        labels.append(value)
        alternatives = _split(element.get("prompt") or "", "|") + _split(element.get("predicted_values") or "", ",|")
        if alternatives:
            prompts[value] = list(dict.fromkeys(alternatives))
    if not labels:
        hint = " (dynamic labels from task data are not supported)" if control.get("value") else ""
        raise ConfigError(f'<BrushLabels name="{name}"> has no <Label value="..."> children{hint}', field=_FIELD)
    return labels, prompts


def _split(text: str, separators: str) -> list[str]:
    parts = re.split("[" + re.escape(separators) + "]", text)
    return [" ".join(part.split()) for part in parts if part.strip()]
