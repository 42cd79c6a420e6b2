"""Referring expressions for synthetic scenes: structured queries, their meaning, and their wording.

A query is a JSON-able dict. Its `kind` says how it picks objects (`attrs` maps some of shape/colour/texture/size
to values; an empty `attrs` means "any shape"):
- attribute:   {"attrs"}                                   the objects with these attributes ("the small red circle")
- position:    {"attrs", "side"}  side in left/right/top/bottom, among exactly two candidates ("the box on the left")
- superlative: {"attrs", "order"} order in leftmost/rightmost/topmost/bottommost/largest/smallest ("the largest star")
- relation:    {"attrs", "relation", "ref"} relation in left_of/right_of/above/below/near, ref = attrs of a unique
               reference object ("the green star below the circle")
- semantic:    {"attrs"} all matching objects, the GT is their union ("all red shapes"; multitask "[semantic]" mode)
`resolve` gives the ids a query refers to; `valid_queries` keeps only unambiguous ones (exactly one referent, clear
margins); `describe` words a query with varied templates and synonyms.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from evf_sam.data.scenes import COLOURS, SHAPES, SIZES, TEXTURES, SceneObject

NOUNS = {
    "circle": (["circle", "round shape", "disk", "disc"], ["circles", "round shapes", "disks"]),
    "square": (["square", "box", "block"], ["squares", "boxes", "blocks"]),
    "triangle": (["triangle", "triangular shape"], ["triangles", "triangular shapes"]),
    "star": (["star", "star shape", "five-pointed star"], ["stars", "star shapes"]),
    "hexagon": (["hexagon", "six-sided shape"], ["hexagons", "six-sided shapes"]),
    "ellipse": (["ellipse", "oval"], ["ellipses", "ovals"]),
}
GENERIC = (["shape", "object", "thing", "figure"], ["shapes", "objects", "things", "figures"])
COLOUR_WORDS = {c: [c] for c in COLOURS} | {"purple": ["purple", "violet"], "cyan": ["cyan", "turquoise"]}
TEXTURE_BEFORE = {"solid": ["solid", "plain"], "striped": ["striped"], "dotted": ["dotted", "polka-dot", "spotted"],
                  "gradient": ["shaded", "gradient"]}
TEXTURE_AFTER = {"solid": ["in a single colour"], "striped": ["with stripes"], "dotted": ["with dots", "with spots"],
                 "gradient": ["with a gradient"]}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "medium": ["medium", "medium-sized", "mid-sized"],
              "large": ["large", "big", "huge"]}
SIDES = {"left": ["the {d} on the left", "the left {d}"], "right": ["the {d} on the right", "the right {d}"],
         "top": ["the {d} at the top", "the upper {d}", "the top {d}"],
         "bottom": ["the {d} at the bottom", "the lower {d}", "the bottom {d}"]}
ORDERS = {"leftmost": ["the leftmost {d}", "the {d} furthest to the left"],
          "rightmost": ["the rightmost {d}", "the {d} furthest to the right"],
          "topmost": ["the topmost {d}", "the highest {d}", "the uppermost {d}"],
          "bottommost": ["the lowest {d}", "the bottommost {d}", "the {d} closest to the bottom"],
          "largest": ["the largest {d}", "the biggest {d}"], "smallest": ["the smallest {d}", "the tiniest {d}"]}
RELATIONS = {"left_of": ["to the left of", "left of", "on the left of"],
             "right_of": ["to the right of", "right of", "on the right of"],
             "above": ["above", "over"], "below": ["below", "under", "beneath"],
             "near": ["next to", "near", "beside", "closest to"]}
RELATION_FORMS = ["the {d} {r} the {ref}", "the {d} that is {r} the {ref}"]
SEMANTIC_FORMS = ["all {p}", "all the {p}", "every {s}", "{p}", "the {p}"]
ATTRIBUTE_FORMS = ["the {d}", "{d}"]
ATTR_KEYS = ("size", "colour", "texture", "shape")
# Centre offsets and area ratios below these count as "not clearly different" (fractions of the shorter side).
POSITION_MARGIN = 0.15
AREA_RATIO = 1.4
NEAR_RATIO = 1.5


def matches(attrs: dict[str, str], objects: list[SceneObject]) -> list[int]:
    """Ids of the objects whose attributes equal every entry of `attrs`."""
    return [o.id for o in objects if all(getattr(o, k) == v for k, v in attrs.items())]


def _coordinate(o: SceneObject, key: str) -> float:
    return {"left": -o.cx, "right": o.cx, "top": -o.cy, "bottom": o.cy}[key]


_ORDER_KEY = {"leftmost": "left", "rightmost": "right", "topmost": "top", "bottommost": "bottom"}
_REL_KEY = {"left_of": "left", "right_of": "right", "above": "top", "below": "bottom"}


def resolve(query: dict[str, Any], objects: list[SceneObject], match=matches) -> list[int]:
    """The ids `query` refers to (for all kinds but semantic, an unambiguous query gives exactly one).

    match: `matches` or a memoised equivalent (used by `valid_queries`)."""
    kind, cands = query["kind"], match(query["attrs"], objects)
    by_id = {o.id: o for o in objects}
    if kind in ("attribute", "semantic"):
        return cands
    if kind == "position":
        if len(cands) != 2:
            return []
        return [max(cands, key=lambda i: _coordinate(by_id[i], query["side"]))]
    if kind == "superlative":
        if not cands:
            return []
        order = query["order"]
        if order in ("largest", "smallest"):
            sign = 1 if order == "largest" else -1
            return [max(cands, key=lambda i: sign * by_id[i].area)]
        return [max(cands, key=lambda i: _coordinate(by_id[i], _ORDER_KEY[order]))]
    refs = match(query["ref"], objects)
    if len(refs) != 1:
        return []
    ref = by_id[refs[0]]
    cands = [i for i in cands if i != ref.id]
    if query["relation"] == "near":
        return [min(cands, key=lambda i: _distance(by_id[i], ref))] if cands else []
    key = _REL_KEY[query["relation"]]
    return [i for i in cands if _coordinate(by_id[i], key) > _coordinate(ref, key)]


def _distance(a: SceneObject, b: SceneObject) -> float:
    return math.hypot(a.cx - b.cx, a.cy - b.cy)


def _clear(query: dict[str, Any], target: int, objects: list[SceneObject], side: int, match=matches) -> bool:
    """Whether the referent of a resolved query wins by a clear margin (so a person would agree)."""
    by_id = {o.id: o for o in objects}
    t, margin = by_id[target], POSITION_MARGIN * side
    others = [by_id[i] for i in match(query["attrs"], objects) if i != target]
    kind = query["kind"]
    if kind == "position":
        return _coordinate(t, query["side"]) - _coordinate(others[0], query["side"]) > margin
    if kind == "superlative":
        order = query["order"]
        if order in ("largest", "smallest"):
            small, big = (others, [t]) if order == "largest" else ([t], others)
            return all(b.area > AREA_RATIO * s.area and b.visible_area > s.visible_area for b in big for s in small)
        key = _ORDER_KEY[order]
        return all(_coordinate(t, key) - _coordinate(o, key) > margin for o in others)
    if kind == "relation":
        (ref_id,) = match(query["ref"], objects)
        ref = by_id[ref_id]
        others = [o for o in others if o.id != ref_id]
        if query["relation"] == "near":
            return all(_distance(o, ref) > NEAR_RATIO * _distance(t, ref) for o in others)
        key = _REL_KEY[query["relation"]]
        along = _coordinate(t, key) - _coordinate(ref, key)
        across = abs(t.cy - ref.cy) if key in ("left", "right") else abs(t.cx - ref.cx)
        # "left of" should look left of, not mostly above or below: the offset along the relation dominates.
        return along > margin and along >= 0.5 * across and all(
            _coordinate(o, key) < _coordinate(ref, key) for o in others)
    return True


def _subsets(obj: SceneObject, keys: tuple[str, ...] = ATTR_KEYS) -> list[dict[str, str]]:
    """Every attribute dict of `obj` over a subset of `keys`, from {} up to all of them."""
    combos = itertools.chain.from_iterable(itertools.combinations(keys, n) for n in range(len(keys) + 1))
    return [{k: getattr(obj, k) for k in combo} for combo in combos]


def valid_queries(objects: list[SceneObject], side: int) -> list[tuple[dict[str, Any], list[int], float]]:
    """Every unambiguous query of the scene with its referent ids and a sampling weight (harder = heavier).

    side: the image's shorter side in pixels (spatial margins scale with it).
    """
    out: list[tuple[dict[str, Any], list[int], float]] = []
    memo: dict[frozenset, list[int]] = {}

    def match(attrs: dict[str, str], objs: list[SceneObject]) -> list[int]:
        key = frozenset(attrs.items())
        if key not in memo:
            memo[key] = matches(attrs, objs)
        return memo[key]

    seen: set[tuple] = set()

    def add(query: dict[str, Any], weight: float) -> None:
        key = (query["kind"], frozenset(query["attrs"].items()), query.get("side", query.get("order")),
               query.get("relation"), frozenset(query.get("ref", {}).items()))
        if key in seen:
            return
        seen.add(key)
        ids = resolve(query, objects, match)
        if query["kind"] == "semantic" or (len(ids) == 1 and _clear(query, ids[0], objects, side, match)):
            out.append((query, ids, weight))

    ref_attrs = {}
    for ref in objects:
        unique = [a for a in _subsets(ref, ("colour", "texture", "shape")) if a and match(a, objects) == [ref.id]]
        if unique:
            ref_attrs[ref.id] = min(unique, key=len)
    for obj in objects:
        unique = [a for a in _subsets(obj) if a and match(a, objects) == [obj.id]]
        minimal = [a for a in unique if not any(b.items() < a.items() for b in unique)]
        for attrs in unique:
            add({"kind": "attribute", "attrs": attrs}, 1.0 if attrs in minimal else 0.3)
        # Spatial kinds only where the attributes alone are ambiguous, so the spatial words are needed.
        for attrs in _subsets(obj):
            count = len(match(attrs, objects))
            if count < 2:
                continue
            if count == 2:
                for s in SIDES:
                    add({"kind": "position", "attrs": attrs, "side": s}, 1.0)
            for order in ORDERS:
                if not (order in ("largest", "smallest") and "size" in attrs):
                    add({"kind": "superlative", "attrs": attrs, "order": order}, 1.0)
            for ref_id, ref in ref_attrs.items():
                if ref_id != obj.id:
                    for rel in RELATIONS:
                        add({"kind": "relation", "attrs": attrs, "relation": rel, "ref": ref}, 0.5)
    for obj in objects:
        for attrs in _subsets(obj, ("colour", "texture", "shape")):
            if attrs:
                add({"kind": "semantic", "attrs": attrs}, 1.0)
    return out


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def noun_phrase(attrs: dict[str, str], rng: np.random.Generator, plural: bool = False) -> str:
    """Words for an attribute set: "[size] [colour] [texture] noun [with texture]", e.g. "small striped box"."""
    before = []
    if "size" in attrs:
        before.append(_pick(rng, SIZE_WORDS[attrs["size"]]))
    if "colour" in attrs:
        before.append(_pick(rng, COLOUR_WORDS[attrs["colour"]]))
    after = []
    if "texture" in attrs:
        if rng.random() < 0.5:
            before.append(_pick(rng, TEXTURE_BEFORE[attrs["texture"]]))
        else:
            after.append(_pick(rng, TEXTURE_AFTER[attrs["texture"]]))
    singular, plurals = NOUNS[attrs["shape"]] if "shape" in attrs else GENERIC
    if not plural and before and "shape" not in attrs and rng.random() < 0.3:
        noun = "one"
    else:
        noun = _pick(rng, plurals if plural else singular)
    return " ".join([*before, noun, *after])


def describe(query: dict[str, Any], rng: np.random.Generator) -> str:
    """Word a query (see the module docstring) with a randomly chosen template and synonyms."""
    kind, attrs = query["kind"], query["attrs"]
    if kind == "semantic":
        form = _pick(rng, SEMANTIC_FORMS)
        return form.format(p=noun_phrase(attrs, rng, plural=True), s=noun_phrase(attrs, rng))
    d = noun_phrase(attrs, rng)
    if kind == "attribute":
        return _pick(rng, ATTRIBUTE_FORMS).format(d=d)
    if kind == "position":
        return _pick(rng, SIDES[query["side"]]).format(d=d)
    if kind == "superlative":
        return _pick(rng, ORDERS[query["order"]]).format(d=d)
    ref = noun_phrase(query["ref"], rng)
    return _pick(rng, RELATION_FORMS).format(d=d, r=_pick(rng, RELATIONS[query["relation"]]), ref=ref)


def random_query(rng: np.random.Generator) -> dict[str, Any]:
    """A random (not scene-checked) query: used to build a text corpus covering every template and word."""
    def attrs(keys=ATTR_KEYS) -> dict[str, str]:
        pools = {"size": list(SIZES), "colour": list(COLOURS), "texture": list(TEXTURES), "shape": list(SHAPES)}
        return {k: _pick(rng, pools[k]) for k in keys if rng.random() < 0.5}

    kind = _pick(rng, ["attribute", "position", "superlative", "relation", "semantic"])
    query: dict[str, Any] = {"kind": kind, "attrs": attrs()}
    if kind == "position":
        query["side"] = _pick(rng, list(SIDES))
    elif kind == "superlative":
        query["order"] = _pick(rng, list(ORDERS))
    elif kind == "relation":
        query["relation"] = _pick(rng, list(RELATIONS))
        query["ref"] = attrs(("colour", "texture", "shape"))
    return query


def vocabulary() -> list[str]:
    """Every word the templates can produce, sorted."""
    tables = [NOUNS, COLOUR_WORDS, TEXTURE_BEFORE, TEXTURE_AFTER, SIZE_WORDS, SIDES, ORDERS, RELATIONS]
    phrases = [*GENERIC[0], *GENERIC[1], "one", *RELATION_FORMS, *SEMANTIC_FORMS, *ATTRIBUTE_FORMS]
    for table in tables:
        for value in table.values():
            phrases.extend(itertools.chain.from_iterable(v if isinstance(v, list) else [v] for v in value))
    words = {w for p in phrases for w in p.split() if not w.startswith("{")}
    return sorted(words)
