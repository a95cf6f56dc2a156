"""How a checkpoint's stored tensors relate to the parameters PEFT adapts in memory.

transformers 5 loads some checkpoints under other names than they are stored under (multimodal
models move `language_model.model.*` to `model.language_model.*`, Mixtral `block_sparse_moe` to
`mlp`) and fuses others (MoE experts stored one matrix per expert become one 3-D parameter).
PEFT names modules and parameters as they are in memory. The mapping used here is transformers'
own: its conversion rules for the base's class (`get_model_conversion_mapping` on a model built on
the meta device) applied to the stored names with its own `rename_source_key`, exactly as
`from_pretrained` does; the fusing operations are then followed symbolically to find where each
stored tensor sits in the fused parameter. transformers is imported only when an adapter needs a
name it cannot find as stored; what cannot be mapped with certainty is refused by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from loramerge.errors import LoramergeError

# One entry per dimension of the in-memory parameter: the stored tensor's position along a
# dimension it does not have (an expert index), or the [start, stop) range it covers.
Index = tuple["int | tuple[int, int]", ...]


@dataclass(frozen=True)
class Piece:
    """One stored tensor and where it sits inside an in-memory parameter."""

    stored: str
    index: Index


@dataclass(frozen=True)
class Layout:
    """An in-memory parameter and the stored tensors transformers assembles it from."""

    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]


class NamesUnavailable(LoramergeError):
    """transformers cannot tell how this checkpoint is loaded (not installed, unknown class)."""


@dataclass
class ModelNames:
    """transformers' view of a checkpoint: in-memory layouts, parameter order, MoE orientation."""

    layouts: dict[str, Layout]
    parameters: dict[str, tuple[str, ...]]  # module -> its own parameters, in registration order
    transposed: frozenset[str]  # modules whose 3-D parameters are (experts, in, out)
    refused: dict[str, str]  # in-memory name -> why its stored tensors cannot be followed

    def layout(self, name: str) -> Layout | None:
        """How parameter `name` is assembled, or None when transformers does not load it."""
        return self.layouts.get(name)


def model_names(config: dict, stored: dict[str, tuple[int, ...]]) -> ModelNames:
    """Map the stored tensor names (with shapes) to in-memory parameters the way transformers
    loads them, for the model class named by `config` (a config.json dict)."""
    try:
        import torch
        import transformers
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        raise NamesUnavailable(
            "transformers is not installed; mapping transformers 5 names needs it "
            "(pip install 'loramerge[verify]')"
        ) from None
    model = _meta_model(config, transformers, torch)
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    memory = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    layouts, refused = _layouts(model, memory, stored, renamings, converters)
    parameters, transposed = {}, set()
    for name, module in model.named_modules():
        own = tuple(n for n, _ in module.named_parameters(recurse=False))
        if own:
            parameters[name] = own
        if getattr(module, "is_transposed", False):  # as PEFT's ParamWrapper reads it
            transposed.add(name)
    return ModelNames(layouts, parameters, frozenset(transposed), refused)


def _meta_model(config: dict, transformers, torch):
    """The base's model class built on the meta device (no memory, no weights)."""
    architecture = (config.get("architectures") or [None])[0]
    if not isinstance(architecture, str):
        raise NamesUnavailable("the base has no config.json naming its model class")
    model_class = getattr(transformers, architecture, None)
    model_type = config.get("model_type")
    if model_class is None or model_type not in transformers.CONFIG_MAPPING:
        raise NamesUnavailable(
            f"transformers {transformers.__version__} does not know the base's class "
            f"{architecture} (model_type {model_type!r})"
        )
    try:
        with _quiet(transformers):
            model_config = transformers.CONFIG_MAPPING[model_type].from_dict(config)
            with torch.device("meta"):
                return model_class(model_config)
    except Exception as exc:  # a config transformers rejects: say so, whatever it raised
        raise NamesUnavailable(
            f"transformers cannot build {architecture} from the base's config.json: "
            f"{type(exc).__name__}: {exc}"
        ) from None


@contextlib.contextmanager
def _quiet(transformers) -> Iterator[None]:
    """transformers' warnings about a config built from a dict are not the user's concern here."""
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _layouts(model, memory, stored, renamings, converters):
    """transformers' `convert_and_load_state_dict_in_model` renaming, without the tensors."""
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    prefix = model.base_model_prefix
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    plain: dict[str, str] = {}
    fused: dict[str, tuple[object, dict[str, list[str]]]] = {}
    for key in sorted(stored, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, memory)
        if renamed not in memory and key in memory:
            renamed, pattern = rename_source_key(key, [], [], prefix, memory)
        if renamed not in memory:
            continue  # transformers would not load it either
        if pattern is None:
            plain[renamed] = key
        else:
            group = fused.setdefault(renamed, (by_pattern[pattern], {}))
            group[1].setdefault(pattern, []).append(key)
    layouts = {
        name: Layout(name, memory[name], (Piece(key, tuple((0, n) for n in stored[key])),))
        for name, key in plain.items()
        if tuple(stored[key]) == memory[name]
    }
    refused = {}
    for name, (converter, collected) in fused.items():
        try:
            layout = _follow(name, converter, collected, stored)
        except _Unsupported as exc:
            refused[name] = str(exc)
            continue
        if layout.shape != memory[name]:
            refused[name] = (
                f"its stored tensors make {list(layout.shape)}, not {list(memory[name])}"
            )
        else:
            layouts[name] = layout
    return layouts, refused


class _Unsupported(Exception):
    """A conversion operation loramerge does not follow."""


@dataclass(frozen=True)
class _Virtual:
    """A tensor during the symbolic conversion: its shape and the stored tensors inside."""

    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]


def _follow(name, converter, collected, stored) -> Layout:
    """Run the converter's operations on shapes and positions instead of tensors."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    state: dict[str, object] = {
        pattern: [
            _Virtual(tuple(stored[k]), (Piece(k, tuple((0, n) for n in stored[k])),)) for k in keys
        ]
        for pattern, keys in collected.items()
    }
    for op in converter.operations:
        if type(op) is MergeModulelist:
            state = {p: _stack(v, op.dim) if isinstance(v, list) else v for p, v in state.items()}
        elif type(op) is Concatenate:
            parts = []
            for pattern in converter.source_patterns:  # the order transformers concatenates in
                value = state.get(pattern)
                parts.extend(value if isinstance(value, list) else [value] if value else [])
            state = {converter.target_patterns[0]: _concatenate(parts, op.dim)}
        else:
            raise _Unsupported(
                f"transformers builds it with {type(op).__name__}, which loramerge does not follow"
            )
    (result,) = state.values()
    if isinstance(result, list):
        if len(result) != 1:
            raise _Unsupported("transformers leaves it as several tensors")
        result = result[0]
    return Layout(name, result.shape, result.pieces)


def _stack(tensors: list[_Virtual], dim: int) -> _Virtual:
    """torch.stack: each tensor gets its position along the new dimension."""
    shapes = {t.shape for t in tensors}
    if len(shapes) != 1:
        raise _Unsupported(f"it stacks tensors of different shapes {sorted(shapes)}")
    pieces = tuple(
        Piece(p.stored, (*p.index[:dim], i, *p.index[dim:]))
        for i, t in enumerate(tensors)
        for p in t.pieces
    )
    shape = shapes.pop()
    return _Virtual((*shape[:dim], len(tensors), *shape[dim:]), pieces)


def _concatenate(tensors: list[_Virtual], dim: int) -> _Virtual:
    """torch.cat: each tensor's positions along `dim` move by the sizes before it."""
    offset, pieces = 0, []
    for t in tensors:
        for p in t.pieces:
            at = p.index[dim]
            moved = at + offset if isinstance(at, int) else (at[0] + offset, at[1] + offset)
            pieces.append(Piece(p.stored, (*p.index[:dim], moved, *p.index[dim + 1 :])))
        offset += t.shape[dim]
    rest = {t.shape[:dim] + t.shape[dim + 1 :] for t in tensors}
    if len(rest) != 1:
        raise _Unsupported("it concatenates tensors whose other dimensions differ")
    shape = tensors[0].shape
    return _Virtual((*shape[:dim], offset, *shape[dim + 1 :]), tuple(pieces))
