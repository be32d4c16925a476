"""What a plugin registers: a method, its family, option schema and capabilities (as data)."""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import annotated_types
import pydantic


Family = Literal["update", "reparam", "attention", "module"]
FAMILIES: tuple[Family, ...] = ("update", "reparam", "attention", "module")
LayerKind = Literal["linear", "conv1d", "embedding"]


@dataclass(frozen=True)
class Capabilities:
    """What a method promises. Tests, the composers rules and the CLI read these flags.

    mergeable: folds into the base weights (``merge``); attention and module adapters do not.
    exportable: its model can be exported to ONNX (merged or as graph terms).
    identity_at_init: with its default options the adapted model equals the base model at
        initialisation (the conformance suite checks it; LoRMA with ``inflation="none"``
        and MAP's ``init="paper"`` over a non-zero update are examples where it does not hold).
    composes_with: the families that may act on the same module as this method (for an
        update: the reparam that wraps it; for an attention adapter: weight adapters beside it).
    layer_kinds: for update and reparam methods, the layer kinds they adapt.
    cheap_norm: an update has a closed-form ``frobenius_sq`` (MAP never builds ΔW over it).
    """

    mergeable: bool
    exportable: bool = True
    identity_at_init: bool = True
    composes_with: frozenset[str] = frozenset()
    layer_kinds: frozenset[str] = frozenset({"linear"})
    cheap_norm: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "mergeable": self.mergeable,
            "exportable": self.exportable,
            "identity_at_init": self.identity_at_init,
            "composes_with": sorted(self.composes_with),
            "layer_kinds": sorted(self.layer_kinds),
            "cheap_norm": self.cheap_norm,
        }


class Options(pydantic.BaseModel):
    """Base class of a method's hyper-parameters. Unknown keys are errors; values are strict.

    A method subclasses this with its own fields (``r: int = 8``...). ``targets`` and
    ``update`` are recipe structure handled by the core, never option fields.

    Two rules hold for every method, so that no plugin can forget them:
    - no float option (nested in lists and optionals too) is NaN or ±Inf: ``lora_alpha = inf``
      passes ``gt=0`` and turns every output into NaN, so it is refused at recipe check;
    - an integer option (a count: ranks, steps, periods) that declares no lower bound of its
      own is at least 0; a field that means something else declares its bound (``ge=-1``).
    """

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @pydantic.field_validator("*", mode="after")
    @classmethod
    def _counts_are_not_negative(cls, value: Any, info: pydantic.ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and any(isinstance(m, (annotated_types.Ge, annotated_types.Gt)) for m in field.metadata):
            return value  # the field's own bound was checked by pydantic
        bad = _negative_int(value)
        if bad is not None:
            raise ValueError(f"a count must be >= 0, got {bad}")
        return value


def _negative_int(value: Any) -> int | None:
    """The first negative int in ``value`` (an int or a list/tuple of them), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value < 0 else None
    if isinstance(value, (list, tuple)):
        for item in value:
            bad = _negative_int(item)
            if bad is not None:
                return bad
    return None


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A read-only copy of ``value`` (a registered format must not change under the export package)."""
    return types.MappingProxyType(dict(value or {}))


@dataclass(frozen=True)
class PeftFormat:
    """How PEFT saves a method: what ``modapt_export``'s ``load_peft``/``save_peft`` read.

    A PEFT adapter folder is ``adapter_config.json`` (``peft_type`` and PEFT's options) plus
    ``adapter_model.safetensors`` with keys ``<prefix><module path>.<file key>`` (no adapter
    name). A method declares this as ``Method(peft=PeftFormat(...))``; the export package reads
    nothing else about the method. A reparam's format lists the update's keys too when PEFT
    stores them together (DoRA: ``lora_A``/``lora_B`` beside ``lora_magnitude_vector``); the
    keys of the reparam and of the update are merged.

    peft_type: PEFT's ``peft_type`` this method is saved under (``"LORA"``, ``"ADALORA"``).
    keys: modapt own key -> key in PEFT's file under the layer path
        (``{"lora_A.weight": "lora_A.weight"}``).
    embedding_keys: the same for embedding layers, when PEFT names them differently
        (``{"lora_A.weight": "lora_embedding_A"}``); empty: ``keys`` serve every layer kind.
    options: modapt option -> PEFT config field (``{"dropout": "lora_dropout"}``).
    patterns: options PEFT keeps per layer in a ``{module pattern: value}`` config field
        (``{"r": "rank_pattern"}``), matched as PEFT does: ``(.*\\.)?(pattern)$``; every key
        is also a key of ``options``.
    config: PEFT config values that select this method (a reparam over PEFT's update, DoRA's
        ``{"use_dora": True}``); checked on load, written back on save.
    rank_pattern: (AdaLoRA) the extra-state key of the bool mask [r]; PEFT keeps it as config
        ``rank_pattern {"<path>.lora_E": [bool]}`` and drops the pruned triplets from the file.
    prefix: PEFT's key prefix.
    """

    peft_type: str
    keys: Mapping[str, str]
    embedding_keys: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, str] = field(default_factory=dict)
    patterns: Mapping[str, str] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    rank_pattern: str | None = None
    prefix: str = "base_model.model."

    def __post_init__(self) -> None:
        if not self.peft_type:
            raise ValueError("PeftFormat.peft_type is empty")
        for name in ("keys", "embedding_keys", "options", "patterns", "config"):
            object.__setattr__(self, name, _frozen_mapping(getattr(self, name)))
        unknown = sorted(set(self.patterns) - set(self.options))
        if unknown:
            raise ValueError(f"PeftFormat.patterns names options not in PeftFormat.options: {', '.join(unknown)}")

    def __reduce__(self):
        # the read-only mappings do not pickle: rebuild from plain dicts (pickle, deepcopy, spawn)
        values = (getattr(self, f.name) for f in fields(self))
        return (type(self), tuple(dict(v) if isinstance(v, Mapping) else v for v in values))

    def file_keys(self, kind: str | None) -> dict[str, str]:
        """modapt own key -> PEFT file key for a layer of ``kind`` (``"embedding"`` or other)."""
        return dict(self.embedding_keys if kind == "embedding" and self.embedding_keys else self.keys)


@dataclass(frozen=True)
class Method:
    """One adapter method, as registered by ``modapt_register_methods``.

    name: the recipe's ``method`` value, unique across plugins (``lora``, ``map``).
    family: ``update``, ``reparam``, ``attention`` or ``module`` (docs/architecture.md).
    options: the :class:`Options` subclass validating this method's recipe keys.
    build: for ``update``: ``build(host, options) -> Update``; for ``reparam``:
        ``build(host, options, update) -> Reparam`` (see :mod:`modapt.update`); for
        ``attention`` and ``module``: ``build(module, options, model) -> Attachment``
        (see :mod:`modapt.attachment`). A :class:`~modapt.lazy.Lazy` keeps torch out of the entry module.
    own_keys: the parameter keys this method adds under the adapted module's path
        (``lora_A.weight``, ``map_alpha``); the conformance suite compares them.
    capabilities: see :class:`Capabilities`.
    description: one line for ``modapt plugins``.
    default_targets: optional ``fn(model) -> list[str]`` used when an adapter entry gives no
        ``targets`` (LMAM targets every attention module by default).
    default_update: for a reparam, the update table used when an entry gives none (DoRA: LoRA).
    peft: optional :class:`PeftFormat`, how PEFT saves this method (read by modapt-export).
    example: one adapter-table entry (``{"method": name, ...}``) that is a valid, small recipe
        entry on :func:`modapt.testing.tiny_llama` (weight methods name ``q_proj``/``v_proj``
        targets); the repository's shared tests (recipe fuzzing, composers, merges) build their
        recipes from it, so a new plugin is covered without editing any list.
    """

    name: str
    family: Family
    options: type[Options]
    build: Callable[..., Any]
    own_keys: tuple[str, ...]
    capabilities: Capabilities
    description: str = ""
    default_targets: Callable[[Any], list[str]] | None = None
    default_update: dict[str, Any] | None = None
    peft: PeftFormat | None = None
    example: dict[str, Any] | None = None
    # filled in by the registry: the distribution and plugin that registered it
    distribution: str = field(default="", compare=False)
    plugin: str = field(default="", compare=False)
