"""Read a PEFT LoRA adapter: its config, the modules its weights touch, and each module's scale.

Key names follow PEFT's `get_peft_model_state_dict` (adapter name stripped, `base_model.model.`
prefix kept). Everything in the weights file must be understood: a tensor we cannot merge
exactly is refused by name, never skipped.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from loramerge.adapter_targets import check_types, untargeted
from loramerge.errors import LoramergeError
from loramerge.hashing import sha256_of
from loramerge.jsonfile import read_json_object
from loramerge.source.checkpoint import Checkpoint, open_weights

PREFIX = "base_model.model."

# Config switches for LoRA variants whose merge is not W0 + s*B@A (or DoRA): refused.
_UNMERGEABLE_SWITCHES = {
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "layer_replication": "layer replication",
}
# Initialisations that rewrite the base weights: the adapter only fits that rewritten base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

_KEY_PATTERNS = [
    ("lora_A", re.compile(r"(?P<m>.+)\.lora_A(\.[^.]+)?\.weight$")),
    ("lora_B", re.compile(r"(?P<m>.+)\.lora_B(\.[^.]+)?\.weight$")),
    ("lora_B_bias", re.compile(r"(?P<m>.+)\.lora_B(\.[^.]+)?\.bias$")),
    ("emb_A", re.compile(r"(?P<m>.+)\.lora_embedding_A(\.[^.]+)?$")),
    ("emb_B", re.compile(r"(?P<m>.+)\.lora_embedding_B(\.[^.]+)?$")),
    ("magnitude", re.compile(r"(?P<m>.+)\.lora_magnitude_vector(\.[^.]+)?(\.weight)?$")),
    ("token_rows", re.compile(r"(?P<m>.+)\.token_adapter\.trainable_tokens_delta(\.[^.]+)?$")),
    ("original", re.compile(r"(?P<m>.+)\.original_module\.(?P<p>weight|bias)$")),
    ("base_copy", re.compile(r"(?P<m>.+)\.base_layer\.(?P<p>weight|bias)$")),
    ("saved", re.compile(r"(?P<m>.+)\.modules_to_save(\.[^.]+)?\.(?P<p>weight|bias)$")),
    ("full", re.compile(r"(?P<m>.+)\.(?P<p>weight|bias)$")),
]
# When one module's whole tensor is stored under several names, the first listed wins:
# current PEFT writes the trained copy as `X.weight` and again as `X.modules_to_save.weight`.
_FULL_PRIORITY = ("full", "saved", "base_copy")
# A quantified group holding a quantifier or an alternation, e.g. (a+)+ or (a|a)*: the shape of
# regular expressions that backtrack exponentially. PEFT's patterns never need one.
_NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*[*+}|](?:[^()\\]|\\.)*\)(?:[*+?]|\{\d)")
_MAX_NAME = 1024
# How PEFT nests one ParamWrapper in another when it adapts several parameters of one module.
_WRAPPED = ".base_layer"

# Tensor names of other PEFT tuners (LoHa, LoKr, IA3, VeRA, AdaLoRA, OFT, ...): refused by name.
_FOREIGN = re.compile(
    r"\.(hada_|lokr_|ia3_|vera_|lora_E|oft_|boft_|fourierft_|vblora_|hra_|ln_tuning|"
    r"lora_embedding_E|ranknum|poly_|xlora|adaption_)"
)


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module: where its tensors are and how to scale them."""

    module: str
    kind: str  # "linear", "conv" or "embedding"
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scale: float
    fan_in_fan_out: bool
    bias_key: str | None = None
    magnitude_key: str | None = None
    # kind "parameter" (target_parameters, PEFT's ParamWrapper): the parameter once the plan has
    # bound it, the wrappers nested inside this one (`base_layer.` levels in its keys), the names
    # it may adapt, and the experts of a 3-D parameter (A holds r rows, B r columns, per expert)
    parameter: str | None = None
    depth: int = 0
    candidates: tuple[str, ...] = ()
    experts: int = 1

    @property
    def transposed(self) -> bool:
        """Whether dW is (B@A)^T: embeddings, Conv1D (fan_in_fan_out) weights and experts stored
        (in, out), as in PEFT."""
        return self.kind == "embedding" or self.fan_in_fan_out

    @property
    def target(self) -> str:
        """The name of the tensor this module changes, in the model's own naming."""
        return f"{self.module}.{self.parameter or 'weight'}"


@dataclass(frozen=True)
class FullTensor:
    """A whole tensor the adapter stores: trained (modules_to_save) or a copy of its base layer.

    PEFT saves an embedding's `base_layer` when the embedding is targeted or resized; such a
    copy equals the base (then it changes nothing) or is the base resized during training.
    """

    target: str  # tensor name in module naming, e.g. "lm_head.weight"
    key: str
    base_copy: bool = False


@dataclass(frozen=True)
class TokenRows:
    """Rows of an embedding the adapter replaces (trainable tokens)."""

    target: str
    key: str
    indices: tuple[int, ...]


@dataclass
class Adapter:
    """A parsed PEFT LoRA adapter with its weights open for reading."""

    path: Path
    config: dict
    weights: Checkpoint
    modules: list[LoraModule] = field(default_factory=list)
    full: list[FullTensor] = field(default_factory=list)
    token_rows: list[TokenRows] = field(default_factory=list)

    @property
    def rank(self) -> int:
        """The config's default rank r."""
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        """The config's default lora_alpha."""
        return float(self.config.get("lora_alpha", self.rank))

    @property
    def use_rslora(self) -> bool:
        """Whether scale is alpha/sqrt(r) (rsLoRA) instead of alpha/r."""
        return bool(self.config.get("use_rslora", False))

    @property
    def use_dora(self) -> bool:
        """Whether the adapter is DoRA (weight-decomposed)."""
        return bool(self.config.get("use_dora", False))

    @property
    def default_scale(self) -> float:
        """Scale of a module no pattern overrides."""
        return lora_scale(self.alpha, self.rank, self.use_rslora)

    def sha256(self) -> str:
        """sha256 of the weights file(s), for the provenance record."""
        return sha256_of(self.weights.files)

    def nonfinite(self) -> list[str]:
        """Names of tensors holding NaN or Inf (read one at a time)."""
        bad = []
        for name, info in self.weights.tensors.items():
            floating = info.dtype in ("F16", "BF16", "F32", "F64")
            if floating and not np.isfinite(self.weights.read(name)).all():
                bad.append(name)
        return bad

    def close(self) -> None:
        """Close the weights file."""
        self.weights.close()


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: alpha/r, or alpha/sqrt(r) for rsLoRA (LoraLayer.update_layer)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def pattern_key(patterns: list[str], module: str) -> str | None:
    """First pattern PEFT would pick for `module` (peft.utils.other.get_pattern_key), or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def load_adapter(path: Path, *, allow_pickle: bool = False) -> Adapter:
    """Parse a PEFT adapter folder: config checks, key mapping, per-module scale."""
    path = Path(path)
    config = _read_config(path)
    weights = open_weights(path, stem="adapter_model", allow_pickle=allow_pickle)
    try:
        adapter = Adapter(path, config, weights)
        _parse_keys(adapter)
        _check_targeted(adapter)
        return adapter
    except BaseException:
        weights.close()
        raise


def _check_targeted(adapter: Adapter) -> None:
    """Refuse LoRA weights for modules the config does not put the adapter on: PEFT never loads
    them (`adapter_targets`), so the merge would not be the model PEFT's adapter gives."""
    names = [m.module for m in adapter.modules if m.kind != "parameter"]  # (target_parameters)
    names = [n[: -len(_WRAPPED)] if n.endswith(_WRAPPED) else n for n in names]
    missing = untargeted(adapter.config, names, _safe_regex)
    if missing:
        config_path = adapter.path / "adapter_config.json"
        raise LoramergeError(
            f"{config_path}: the weights hold LoRA for {len(missing)} module(s) that "
            f"target_modules / exclude_modules / layers_to_transform leave out, which PEFT "
            f"would not load: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
        )


def _safe_regex(pattern: str) -> bool:
    """Whether a regex from a config can be matched without risk of exponential time."""
    if len(pattern) > _MAX_NAME or _NESTED_QUANTIFIER.search(pattern):
        return False
    try:
        re.compile(pattern)
    except (re.error, RecursionError):
        return False
    return True


def _read_config(path: Path) -> dict:
    config_path = path / "adapter_config.json"
    if not path.is_dir():
        raise LoramergeError(f"{path}: an adapter is a folder with adapter_config.json")
    if not config_path.is_file():
        raise LoramergeError(f"{path}: no adapter_config.json (is this a PEFT adapter folder?)")
    config = read_json_object(config_path)
    peft_type = config.get("peft_type")
    if peft_type is None:  # PEFT's own loader (PeftModel.from_pretrained) refuses it too
        raise LoramergeError(
            f"{config_path}: no peft_type, so nothing says this is a LoRA adapter; PEFT writes "
            'one ("peft_type": "LORA" for LoRA)'
        )
    if peft_type != "LORA":
        raise LoramergeError(f"{config_path}: peft_type {peft_type!r} is not LoRA; cannot merge")
    for switch, name in _UNMERGEABLE_SWITCHES.items():
        if config.get(switch):
            raise LoramergeError(f"{config_path}: {name} ({switch}) cannot be merged exactly")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise LoramergeError(
            f"{config_path}: init_lora_weights={init!r} rewrites the base weights, so this adapter "
            "does not fit the original base; convert it to plain LoRA with PEFT first "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    _check_types(config_path, config)
    return config


def _check_types(config_path: Path, config: dict) -> None:
    """Fields we rely on must have the types PEFT gives them."""
    rank = config.get("r")
    if not _is_int(rank) or not 0 < rank <= 65536:
        raise LoramergeError(f"{config_path}: r must be a positive integer, got {rank!r}")
    alpha = config.get("lora_alpha", rank)
    if not _is_number(alpha):
        raise LoramergeError(f"{config_path}: lora_alpha must be a number, got {alpha!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(name) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(k, str) and _is_number(v) and v > 0 for k, v in pattern.items()
        ):
            raise LoramergeError(f"{config_path}: {name} must map strings to positive numbers")
        for key in pattern:
            if len(key) > _MAX_NAME or _NESTED_QUANTIFIER.search(key):
                raise LoramergeError(
                    f"{config_path}: {name} key {key[:60]!r} is too long or nests quantifiers "
                    "(it could take exponential time to match); write it without nesting"
                )
            try:
                re.compile(rf"(.*\.)?({key})$")
            except (re.error, RecursionError) as exc:
                raise LoramergeError(
                    f"{config_path}: {name} key {key!r} is not a regex: {exc}"
                ) from None
    for name in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
        if not isinstance(config.get(name, False), bool):
            raise LoramergeError(f"{config_path}: {name} must be true or false")
    targets = config.get("target_parameters") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise LoramergeError(f"{config_path}: target_parameters must be a list of names")
    wrong = check_types(config)
    if wrong:
        raise LoramergeError(f"{config_path}: {wrong}")


def _parse_keys(adapter: Adapter) -> None:
    """Sort every weight key into LoRA modules, full tensors and token rows."""
    groups: dict[str, dict[str, str]] = {}
    full: dict[str, dict[str, str]] = {}
    where = adapter.weights.files[0]
    for key in adapter.weights.tensors:
        if len(key) > _MAX_NAME:
            raise LoramergeError(f"{where}: a tensor name is {len(key)} characters long")
        if _FOREIGN.search(key):
            raise LoramergeError(f"{where}: {key!r} belongs to another PEFT tuner; cannot merge")
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        role, match = _classify(name)
        if match is None:
            raise LoramergeError(f"{where}: cannot interpret tensor {key!r}")
        module = match["m"]
        if role in _FULL_PRIORITY:
            full.setdefault(f"{module}.{match['p']}", {})[role] = key
        elif role != "original":  # the frozen original of a modules_to_save: not merged
            groups.setdefault(module, {})[role] = key
    for target, roles in full.items():
        role = next(r for r in _FULL_PRIORITY if r in roles)
        adapter.full.append(FullTensor(target, roles[role], base_copy=role == "base_copy"))
    for module, roles in groups.items():
        if "token_rows" in roles:
            adapter.token_rows.append(_token_rows(adapter, module, roles.pop("token_rows")))
        if roles:
            adapter.modules.append(_lora_module(adapter, module, roles))


def _classify(name: str) -> tuple[str, re.Match | None]:
    """The role of a key (lora_A, magnitude, full, ...) and its match, first pattern wins."""
    for role, pattern in _KEY_PATTERNS:
        match = pattern.match(name)
        if match:
            return role, match
    return "", None


def _lora_module(adapter: Adapter, module: str, roles: dict[str, str]) -> LoraModule:
    """Build one LoraModule from its A/B (and optional bias, magnitude) keys."""
    where = adapter.weights.files[0]
    embedding = "emb_A" in roles or "emb_B" in roles
    a_key = roles.get("emb_A" if embedding else "lora_A")
    b_key = roles.get("emb_B" if embedding else "lora_B")
    if a_key is None or b_key is None:
        raise LoramergeError(f"{where}: module {module!r} has lora_A or lora_B but not both")
    a = adapter.weights.tensors[a_key].shape
    b = adapter.weights.tensors[b_key].shape
    if embedding:
        kind, rank_a, rank_b = "embedding", a[0] if a else -1, b[1] if len(b) == 2 else -1
        ok_dims = len(a) == 2 and len(b) == 2
    else:
        kind = "linear" if len(a) == 2 else "conv"
        rank_a, rank_b = (a[0] if a else -1), (b[1] if len(b) >= 2 else -1)
        ok_dims = len(a) == len(b) and len(a) in (2, 3, 4, 5)
    if kind == "conv" and ok_dims and rank_b > 0 and rank_a != rank_b and rank_a % rank_b == 0:
        raise LoramergeError(
            f"{where}: module {module!r} is LoRA on a grouped convolution "
            f"(groups={rank_a // rank_b}); PEFT cannot merge that and neither can loramerge"
        )
    if not ok_dims or rank_a != rank_b or rank_a <= 0:
        raise LoramergeError(
            f"{where}: module {module!r}: A {list(a)} and B {list(b)} do not make a rank-r pair"
        )
    config = adapter.config
    wrapped, depth = module, 0
    while wrapped.endswith(_WRAPPED):
        wrapped, depth = wrapped[: -len(_WRAPPED)], depth + 1
    candidates = _parameter_candidates(adapter, wrapped)
    if not embedding and kind == "linear" and (depth or candidates):
        return _parameter_module(adapter, wrapped, depth, candidates, roles, a_key, b_key)
    rank, alpha = _rank_alpha(adapter, module)
    if rank != rank_a:
        raise LoramergeError(
            f"{where}: module {module!r} has rank {rank_a} in its weights but the config "
            f"(r / rank_pattern) says {rank}"
        )
    if "magnitude" in roles and not adapter.use_dora:
        raise LoramergeError(f"{where}: {module!r} has a DoRA magnitude but use_dora is false")
    if adapter.use_dora and "magnitude" not in roles:
        raise LoramergeError(f"{where}: use_dora is set but {module!r} has no magnitude vector")
    return LoraModule(
        module=module,
        kind=kind,
        a_key=a_key,
        b_key=b_key,
        rank=rank,
        alpha=alpha,
        scale=lora_scale(alpha, rank, adapter.use_rslora),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)) and kind == "linear",
        bias_key=roles.get("lora_B_bias"),
        magnitude_key=roles.get("magnitude"),
    )


def _rank_alpha(adapter: Adapter, name: str) -> tuple[int, float]:
    """r and lora_alpha PEFT gives the module or parameter `name` (rank_pattern, alpha_pattern)."""
    config = adapter.config
    r_key = pattern_key(list((config.get("rank_pattern") or {}).keys()), name)
    rank = int(config["rank_pattern"][r_key]) if r_key else adapter.rank
    alpha_key = pattern_key(list((config.get("alpha_pattern") or {}).keys()), name)
    alpha = float(config["alpha_pattern"][alpha_key]) if alpha_key else adapter.alpha
    return rank, alpha


def _parameter_candidates(adapter: Adapter, module: str) -> tuple[str, ...]:
    """Parameter names of `module` that target_parameters reaches, by PEFT's rule: the name
    `module.param` equals an entry or ends with `.entry`."""
    found = []
    for entry in adapter.config.get("target_parameters") or []:
        owner, _, parameter = entry.rpartition(".")
        if (not owner or module == owner or module.endswith("." + owner)) and (
            parameter not in found
        ):
            found.append(parameter)
    return tuple(found)


def _parameter_module(
    adapter: Adapter,
    module: str,
    depth: int,
    candidates: tuple[str, ...],
    roles: dict[str, str],
    a_key: str,
    b_key: str,
) -> LoraModule:
    """A ParamWrapper (target_parameters): its parameter, rank and scale are bound by the plan."""
    where = adapter.weights.files[0]
    extra = {"lora_B_bias": "a lora_B bias", "magnitude": "a DoRA magnitude"}
    for role, what in extra.items():
        if role in roles:
            raise LoramergeError(
                f"{where}: {module!r} adapts a raw parameter (target_parameters) but has {what}; "
                "PEFT's ParamWrapper has neither, so this is not an adapter PEFT wrote"
            )
    if not candidates:
        raise LoramergeError(
            f"{where}: {module!r} is nested in a parameter wrapper but target_parameters names "
            "no parameter of it"
        )
    return LoraModule(
        module=module,
        kind="parameter",
        a_key=a_key,
        b_key=b_key,
        rank=adapter.rank,
        alpha=adapter.alpha,
        scale=adapter.default_scale,
        fan_in_fan_out=False,
        depth=depth,
        candidates=candidates,
    )


def bind_parameter(
    adapter: Adapter, module: LoraModule, parameter: str, experts: int, transposed: bool
) -> LoraModule:
    """A target_parameters module once its parameter is known: r, alpha and scale as PEFT gives
    them to `module.parameter`, and the expert count of a 3-D parameter (1 for a matrix)."""
    rank, alpha = _rank_alpha(adapter, f"{module.module}.{parameter}")
    a = adapter.weights.tensors[module.a_key].shape
    b = adapter.weights.tensors[module.b_key].shape
    if a[0] != rank * experts or b[1] != rank * experts:
        raise LoramergeError(
            f"{adapter.path.name}: {module.module}.{parameter}: A {list(a)} and B {list(b)} do "
            f"not hold rank {rank} (r / rank_pattern) for each of its {experts} expert(s)"
        )
    return replace(
        module,
        parameter=parameter,
        rank=rank,
        alpha=alpha,
        scale=lora_scale(alpha, rank, adapter.use_rslora),
        fan_in_fan_out=transposed,
        experts=experts,
    )


def _token_rows(adapter: Adapter, module: str, key: str) -> TokenRows:
    """Trainable-token rows: the config's indices for this module, checked against the tensor."""
    spec = adapter.config.get("trainable_token_indices")
    if isinstance(spec, dict):
        matches = [v for k, v in spec.items() if module == k or module.endswith("." + k)]
        indices = matches[0] if len(matches) == 1 else None
    else:
        indices = spec
    shape = adapter.weights.tensors[key].shape
    if (
        not isinstance(indices, list)
        or not indices
        or not all(_is_int(i) and 0 <= i < 2**31 for i in indices)
        or len(shape) != 2
        or shape[0] != len(indices)
    ):
        raise LoramergeError(
            f"{adapter.path}: trainable tokens of {module!r}: indices {indices!r} do not fit "
            f"the stored rows {list(shape)}"
        )
    return TokenRows(f"{module}.weight", key, tuple(indices))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A finite number of sane size (a 400-digit alpha is an attack, not a config)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) < 1e12  # False for nan and inf too
