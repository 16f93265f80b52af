"""YAML in and out, and the JSON Schema of the spec format."""
from __future__ import annotations

import copy
from pathlib import Path
from collections.abc import Hashable
from typing import Any

import yaml

from hybridlm.errors import SpecError, shorten
from hybridlm.layouts.registry import block_kinds, block_spec_class
from hybridlm.layouts.spec import ModelSpec


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):
            mark = key_node.start_mark
            raise SpecError("", f"a mapping key must be a plain value, not a {type(key).__name__}, "
                                f"at line {mark.line + 1}, column {mark.column + 1}")
        if key in out:
            mark = key_node.start_mark
            raise SpecError("", f"duplicate key {shorten(repr(key))} at line {mark.line + 1}, column {mark.column + 1}")
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


MAX_SPEC_BYTES = 1 << 20  # 1 MiB: a spec of 100,000 blocks is a short pattern, not a big file
MAX_SPEC_NODES = 1_000_000  # YAML nodes after alias expansion: about what 1 MiB can spell out


def _expanded_nodes(root: yaml.Node, source: str) -> int:
    """How many nodes ``root`` stands for once every alias is expanded, counted once per node (memo),
    so an alias bomb ('billion laughs') is measured without being built."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in in_progress:
            raise SpecError("", f"{source} holds a recursive YAML alias (an anchor used inside itself)")
        in_progress.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        in_progress.discard(key)
        sizes[key] = min(total, MAX_SPEC_NODES + 1)  # saturate: sums stay small integers
        return sizes[key]

    return size(root)


def _parse_yaml(text: str, source: str) -> Any:
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, source) > MAX_SPEC_NODES:
            raise SpecError("", f"{source} expands to more than {MAX_SPEC_NODES:,} YAML nodes once its aliases "
                                f"(*name) are expanded; write the spec out without repeated aliases")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def spec_from_yaml(text: str, source: str = "<yaml>") -> ModelSpec:
    if len(text) > MAX_SPEC_BYTES:  # characters, checked before the YAML parser sees any of it
        raise SpecError("", f"{source} is {len(text):,} characters, more than the {MAX_SPEC_BYTES:,} a spec may "
                            f"have (a pattern such as '(M F) *1000' keeps a long model short)")
    try:
        data = _parse_yaml(text, source)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError("", f"YAML syntax error in {source}{where}: {shorten(problem)}") from None
    except RecursionError:
        raise SpecError("", f"{source} nests YAML lists or mappings too deeply") from None
    if data is None:
        raise SpecError("", f"{source} is empty")
    return ModelSpec.model_validate(data)


def load_spec(path: str | Path) -> ModelSpec:
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)  # never more: /dev/zero or a huge file stops here
    except OSError as err:
        raise SpecError("", f"cannot read spec file {str(path)!r}: {err.strerror}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError("", f"spec file {str(path)!r} is larger than {MAX_SPEC_BYTES:,} bytes, the most a spec "
                            f"may have: is it the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError("", f"spec file {str(path)!r} is not UTF-8 text (byte {err.start} is "
                            f"{raw[err.start:err.start + 1]!r}): save it as UTF-8") from None
    return spec_from_yaml(text, source=str(path))


def dump_spec(spec: ModelSpec, *, exclude_defaults: bool = True) -> str:
    return yaml.safe_dump(spec.to_dict(exclude_defaults=exclude_defaults), sort_keys=False,
                          default_flow_style=None, width=100)


def save_spec(spec: ModelSpec, path: str | Path) -> None:
    Path(path).write_text(dump_spec(spec))


def spec_json_schema() -> dict[str, Any]:
    """JSON Schema of the spec format, with one entry per registered block kind."""
    schema = copy.deepcopy(ModelSpec.model_json_schema())
    defs = schema.setdefault("$defs", {})
    defs.pop("BlockSpec", None)
    refs = {}
    for kind in block_kinds():
        cls = block_spec_class(kind)
        sub = cls.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(sub.pop("$defs", {}))
        defs[cls.__name__] = sub
        refs[kind] = f"#/$defs/{cls.__name__}"
    schema["properties"]["blocks"]["additionalProperties"] = {
        "oneOf": [{"$ref": r} for r in refs.values()],
        "discriminator": {"propertyName": "kind", "mapping": refs},
    }
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
