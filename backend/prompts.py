"""Prompt resolution (ARCHITECTURE §4): which (prompt, label) pairs to run for one task and one brush target.

First rule that yields anything wins, per task and target:

1. "context": text of an interactive `<TextArea>` submit bound to the target's image
   (`params.context.result[] = {"type": "textarea", "from_name", "to_name", "value": {"text": [..]}}`),
   one prompt per line.
2. "task": the task data field `prompt_field` (default "prompt"): a string, a list of strings, or a
   `{label: prompt | [prompts]}` mapping.
3./4. per label: "extra_params" prompts (`{"prompts": {label: prompt | [..]}}` from /setup; a nested
   `{from_name: {label: ..}}` scopes them to one control), else "config" prompts (`prompt=` / `predicted_values=` on the
   `<Label>`), else "label": the label value itself ("Traffic_light" → "traffic light").

Labels of free text (rules 1 and 2 as strings): a "Label: prompt" prefix naming one of the target's labels
(case-insensitive) picks that label; else a text equal to a label or to one of its prompts picks that label; else the
target's first label. A prefix that is not a label stays part of the prompt ("note: the red car").

Fields that are missing, null, "" or [] count as absent (the next rule applies); an empty or non-text item inside a
list or mapping, a prompt over `max_length` characters, or a mapping naming an unknown label raises PromptError.
Each alternative is its own PromptRequest (its own mask); duplicates of (prompt, label) are dropped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from backend.errors import PromptError
from backend.label_config import BrushTarget

DEFAULT_MAX_LENGTH = 300
_SCOPE_HINT = {"extra_params": '; with several brush controls, scope prompts as {"<control name>": {label: prompt}}'}


@dataclass(frozen=True)
class PromptRequest:
    """One text prompt to segment, the label its masks get ("" for a plain `<Brush>`), and the rule that chose it."""

    prompt: str
    label: str
    source: str  # "context" | "task" | "extra_params" | "config" | "label"


def resolve(task: dict[str, Any], target: BrushTarget, *, context: dict[str, Any] | None = None,
            extra_params: dict[str, Any] | None = None, prompt_field: str = "prompt",
            max_length: int = DEFAULT_MAX_LENGTH) -> list[PromptRequest]:
    """The prompts of `task` for `target`, by the first rule that yields any (module docstring). Raises PromptError."""
    resolver = _Resolver(target, max_length)
    found = resolver.from_context(context)
    if not found:
        data = task.get("data") if isinstance(task, dict) else None
        found = resolver.from_task(data.get(prompt_field) if isinstance(data, dict) else None, prompt_field)
    if not found:
        found = resolver.per_label(extra_params)
    return list(dict.fromkeys(found))


def prompt_set_hash(targets: Iterable[BrushTarget], extra_params: dict[str, Any] | None = None,
                    **more: Any) -> str:
    """Stable hex digest of what decides a project's prompts (targets, labels, per-label prompts, extra_params and any
    `more` JSON-able settings), for the "-p…" part of model_version. Independent of dict order."""
    blob = {"targets": [[t.from_name, t.to_name, t.value_key, t.control_type, list(t.labels),
                         {k: list(v) for k, v in t.label_prompts.items()}, list(t.textareas)] for t in targets],
            "extra_params": extra_params or {}, "more": more}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


class _Resolver:
    def __init__(self, target: BrushTarget, max_length: int) -> None:
        self.target = target
        self.max_length = max_length
        self.by_lower = {label.lower(): label for label in target.labels}

    # --- rules ------------------------------------------------------------------------------------------------

    def from_context(self, context: dict[str, Any] | None) -> list[PromptRequest]:
        if not isinstance(context, dict) or not isinstance(context.get("result"), list):
            return []
        found: list[PromptRequest] = []
        for index, item in enumerate(context["result"]):
            if not isinstance(item, dict) or str(item.get("type", "")).lower() != "textarea":
                continue
            if item.get("from_name") not in self.target.textareas and item.get("to_name") != self.target.to_name:
                continue
            if item.get("to_name") not in (None, self.target.to_name):
                continue
            texts = (item.get("value") or {}).get("text") if isinstance(item.get("value"), dict) else None
            where = f"context.result[{index}].value.text"
            for number, text in enumerate(_as_list(texts)):
                lines = text.splitlines() if isinstance(text, str) else [text]
                found.extend(self._free_text(line, f"{where}[{number}]", "context")
                             for line in lines if not _is_blank(line))
        return found

    def from_task(self, value: Any, prompt_field: str) -> list[PromptRequest]:
        where = f"data.{prompt_field}"
        if _is_blank(value) or value == [] or value == {}:
            return []
        if isinstance(value, dict):
            return self._mapping(value, where, "task")
        if isinstance(value, list):
            return [self._free_text(item, f"{where}[{number}]", "task") for number, item in enumerate(value)]
        return [self._free_text(value, where, "task")]

    def per_label(self, extra_params: dict[str, Any] | None) -> list[PromptRequest]:
        if not self.target.labels:
            return []
        overrides = self._extra_prompts(extra_params)
        found: list[PromptRequest] = []
        for label in self.target.labels:
            if label in overrides:
                found.extend(overrides[label])
            elif label in self.target.label_prompts:
                where = f"label_config <Label value={label!r}>"
                found.extend(PromptRequest(self._text(prompt, where), label, "config")
                             for prompt in self.target.label_prompts[label])
            else:
                found.append(PromptRequest(self._text(" ".join(label.replace("_", " ").split()).lower(),
                                                      f"label {label!r}"), label, "label"))
        return found

    # --- helpers ----------------------------------------------------------------------------------------------

    def _extra_prompts(self, extra_params: dict[str, Any] | None) -> dict[str, list[PromptRequest]]:
        prompts = extra_params.get("prompts") if isinstance(extra_params, dict) else None
        if prompts is None:
            return {}
        if not isinstance(prompts, dict):
            raise PromptError("extra_params.prompts must be a mapping {label: prompt or [prompts]}",
                              field="extra_params.prompts")
        plain = {key: value for key, value in prompts.items() if not isinstance(value, dict)}
        scoped = prompts.get(self.target.from_name)
        if isinstance(scoped, dict):
            plain.update(scoped)
            where = f"extra_params.prompts.{self.target.from_name}"
        else:
            where = "extra_params.prompts"
        grouped: dict[str, list[PromptRequest]] = {}
        for request in self._mapping(plain, where, "extra_params"):
            grouped.setdefault(request.label, []).append(request)
        return grouped

    def _mapping(self, mapping: dict[Any, Any], where: str, source: str) -> list[PromptRequest]:
        if not self.target.labels:
            raise PromptError(f"{where} maps labels to prompts, but <Brush name=\"{self.target.from_name}\"> has no "
                              "labels; give a prompt string or a list of prompts", field=where)
        found: list[PromptRequest] = []
        for key, value in mapping.items():
            label = self.by_lower.get(str(key).lower())
            if label is None:
                raise PromptError(f"{where} names the label {str(key)!r}, which is not a label of "
                                  f"<BrushLabels name=\"{self.target.from_name}\"> (labels: "
                                  f"{', '.join(self.target.labels)})" + _SCOPE_HINT.get(source, ""),
                                  field=f"{where}.{key}")
            items = value if isinstance(value, list) else [value]
            if not items:
                raise PromptError(f"{where}.{key} is an empty list", field=f"{where}.{key}")
            found.extend(PromptRequest(self._text(item, f"{where}.{key}"), label, source) for item in items)
        return found

    def _free_text(self, value: Any, where: str, source: str) -> PromptRequest:
        text = self._text(value, where)
        if not self.target.labels:
            return PromptRequest(text, "", source)
        head, colon, tail = text.partition(":")
        label = self.by_lower.get(head.strip().lower()) if colon else None
        if label is not None:
            return PromptRequest(self._text(tail, where), label, source)
        return PromptRequest(text, self._label_matching(text) or self.target.labels[0], source)

    def _label_matching(self, text: str) -> str | None:
        lowered = text.lower()
        if lowered in self.by_lower:
            return self.by_lower[lowered]
        for label, prompts in self.target.label_prompts.items():
            if lowered in (p.lower() for p in prompts):
                return label
        return None

    def _text(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise PromptError(f"{where} must be text, not {type(value).__name__}", field=where)
        text = " ".join(value.split())
        if not text:
            raise PromptError(f"{where} is an empty prompt", field=where)
        if len(text) > self.max_length:
            raise PromptError(f"{where}: prompt of {len(text)} characters is longer than the limit of "
                              f"{self.max_length}", field=where)
        return text


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())
