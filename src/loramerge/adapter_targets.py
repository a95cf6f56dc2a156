"""Which modules PEFT puts an adapter on, by its config: weights for any other module are never
loaded by PEFT, so merging them would give a model PEFT's own adapter is not.

PEFT's rule (`peft.tuners.tuners_utils.check_target_module_exists`), for a module's name in the
model: `exclude_modules` (a regex, full match; or names, equal or a dotted suffix) rules it
out; `target_modules` as a string is a regex the name must fully match; as a list, the name
must equal an entry or end with `.entry`, and then `layers_to_transform` (an index or a list),
when given, must hold the first number in the name after one dotted segment (after one of
`layers_pattern` when given). Where the config leaves the choice to PEFT (no target_modules:
PEFT's per-architecture defaults; `all-linear`, expanded when the adapter was made) there is
nothing to hold the weights against, and nothing is refused.
"""

from __future__ import annotations

import re

_NUMBERS = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


def untargeted(config: dict, modules: list[str], safe_regex) -> list[str]:
    """The names among `modules` PEFT would not put this adapter on; `safe_regex(pattern)` says
    whether a regex from the config can be matched without risk of exponential time (one that
    cannot is not held against anything)."""
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return []
    layers_pattern = config.get("layers_pattern") or []
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    regexes = [*patterns, *(t for t in (targets,) if isinstance(t, str))]
    if not all(map(safe_regex, regexes)):
        return []
    excluded = config.get("exclude_modules")
    if isinstance(excluded, str) and not safe_regex(excluded):
        excluded = None
    layers = config.get("layers_to_transform")
    return [
        m for m in modules if _excluded(excluded, m) or not _targeted(targets, layers, patterns, m)
    ]


def check_types(config: dict) -> str | None:
    """What is wrong with the types of the config's targeting fields, or None."""
    for name in ("target_modules", "exclude_modules", "layers_pattern"):
        value = config.get(name)
        if not (value is None or isinstance(value, str) or _strings(value)):
            return f"{name} must be a string or a list of strings"
    layers = config.get("layers_to_transform")
    listed = isinstance(layers, list) and all(map(_integer, layers))
    if not (layers is None or _integer(layers) or listed):
        return "layers_to_transform must be an integer or a list of integers"
    return None


def _excluded(excluded, key: str) -> bool:
    if not excluded:
        return False
    if isinstance(excluded, str):
        return re.fullmatch(excluded, key) is not None
    return key in excluded or any(key.endswith(f".{e}") for e in excluded)


def _targeted(targets, layers, patterns: list[str], key: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    if layers is None or layers == []:
        return True
    if not patterns:
        match = _NUMBERS.match(key)
    else:
        found = (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key) for p in patterns)
        match = next((m for m in found if m is not None), None)
    if match is None:
        return False
    index = int(match["idx"])
    return index == layers if _integer(layers) else index in layers


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
