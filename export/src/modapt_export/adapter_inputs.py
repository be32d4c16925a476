"""``--adapters-as-inputs``: one base graph whose adapter tensors are graph inputs, plus one
``adapters/<name>.onnx_adapter`` file per adapter, switchable per request.

The graph computes each adapted layer's *unmerged* forward, ``reparam(W0, update)(x)``, with the
adapter's tensors (LoRA's ``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r], DoRA's
``lora_magnitude_vector`` [out], MAP's ``map_alpha``/``map_beta``, LoRMA's ``lorma_A``/``lorma_B``,
AdaLoRA's ``lora_E`` and ``rank_pattern``, FLoRA's core ``flora_G`` ...) read from graph inputs named
as in ``modapt.adapter_state_dict`` (``model.layers.0.self_attn.q_proj.lora_A.weight``). So the
reparam (DoRA's row norms of W0 + ΔW, MAP's ‖W0‖/‖ΔW‖ normalisation) is computed in the graph
from the inputs; nothing about an adapter is folded into a constant.

How: the traced wrapper takes the adapter tensors as extra positional inputs and runs the model
with them through ``torch.func.functional_call``, so they are real graph inputs (the exporter's
optimiser cannot fold them into constants). Afterwards each input gets an initializer of the same
name holding its "no adapter" value: ONNX Runtime then treats it as an overridable initializer
(optional input with a default), and ``onnxruntime.LoraAdapter`` / GenAI's ``og.Adapters``
override it per run.

"No adapter" values = the recipe's own identity initialisation (LoRA's B = 0, DoRA's magnitude =
‖W0‖ row norms, MAP's α = ‖W0‖_F, β = 0 with init="identity"), checked layer by layer against
the base layer: the graph alone gives the base model's outputs, which the export verifies.

``onnxruntime.AdapterFormat`` takes neither 0-dim nor bool tensors: MAP's scalar α, β are [1] inputs
(reshaped to [] inside the graph), AdaLoRA's bool ``rank_pattern`` [r] is a float32 input (cast back).

All adapters of one export must have the same recipe (methods, targets, ranks, options that enter
the forward: LoRA's scaling α/r is a constant of the graph, not an input). A mismatch is refused
naming the layer, or the recipe key.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import modapt
from modapt.apply import adapter_state_dict

ADAPTERS_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"


class AdapterSetError(modapt.ModaptError):
    """The adapters given to ``--adapters-as-inputs`` cannot share one graph."""


@dataclass
class AdapterSet:
    """The adapters of one export: names, recipe, tensors per adapter, and the defaults.

    ``tensors[name]`` and ``defaults`` map graph input names to tensors of equal shapes.
    """

    names: list[str]
    recipe: modapt.Recipe
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    defaults: dict[str, torch.Tensor] = field(default_factory=dict)
    #: inputs that are 0-dim in the model (MAP's α, β): [1] in the graph and the adapter files,
    #: since ``onnxruntime.AdapterFormat`` refuses parameters without dims
    scalars: set[str] = field(default_factory=set)
    #: inputs whose model dtype ``AdapterFormat`` does not take (AdaLoRA's bool ``rank_pattern``):
    #: float32 in the graph and the files, cast back to this dtype inside the graph
    casts: dict[str, torch.dtype] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return list(self.defaults)


def adapter_name(directory: str | Path) -> str:
    """``adapters/<name>.onnx_adapter``: the adapter folder's own name."""
    return Path(directory).resolve().name


def _layer_of(name: str, layer_paths: list[str]) -> str:
    best = max((p for p in layer_paths if name.startswith(p + ".")), key=len, default=None)
    return best or name.rsplit(".", 1)[0]


def _first_recipe_difference(a, b, where: str = "adapter") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            found = _first_recipe_difference(a.get(key), b.get(key), f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_recipe_difference(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if a == b else f"{where} ({a!r} vs {b!r})"


#: recipe keys that only set the initialisation: they do not enter the forward
_INIT_KEYS = ("init", "init_lora_weights", "identity_std", "seed")


def _strip_init(value):
    if isinstance(value, dict):
        return {k: _strip_init(v) for k, v in value.items() if k not in _INIT_KEYS}
    if isinstance(value, list):
        return [_strip_init(v) for v in value]
    return value


def _identity_recipe(recipe_dict: dict, registry: modapt.Registry) -> modapt.Recipe:
    """The recipe with every ``init`` option set to ``"identity"`` where the method accepts that value
    (MAP's ``init = "paper"`` starts at β = 1, not at W0): only the defaults depend on it."""
    out = copy.deepcopy(recipe_dict)

    def entries(value):
        if isinstance(value, dict):
            if "init" in value:
                yield value
            for v in value.values():
                yield from entries(v)
        elif isinstance(value, list):
            for v in value:
                yield from entries(v)

    for entry in list(entries(out)):
        before = entry["init"]
        if before == "identity":
            continue
        entry["init"] = "identity"
        try:
            modapt.parse_recipe(out, registry)
        except modapt.RecipeError:  # this method has no identity init by that name: keep its own
            entry["init"] = before
    return modapt.parse_recipe(out, registry)


def read_adapter_set(model: nn.Module, directories: list, registry: modapt.Registry | None = None) -> AdapterSet:
    """Read every adapter folder (modapt or PEFT), apply the shared recipe to ``model`` (a base
    model, changed in place: it becomes the template that is traced) with its identity
    initialisation, and check that every adapter fits it.

    :raises AdapterSetError: two folders with one name, recipes that differ, a layer whose tensors
        differ in name or shape (rank, targets), an adapter that is not a weight adapter (LMAM,
        bottleneck modules), a layer whose initialisation is not the identity.
    """
    from .merge import read_adapter  # modapt and PEFT folders, as ``modapt merge`` reads them

    registry = registry or modapt.default_registry()
    if not directories:
        raise AdapterSetError("--adapters-as-inputs needs at least one --adapter")
    names = [adapter_name(d) for d in directories]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise AdapterSetError(f"two --adapter folders are named '{dup}': the .onnx_adapter files are named after "
                              "the folders, rename one")
    sources = [read_adapter(d, registry) for d in directories]
    first = sources[0].recipe.to_dict()
    recipe = _identity_recipe(first, registry)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the defaults' random halves (LoRA's A) are fixed: exports are reproducible
    try:
        modapt.apply(model, recipe, registry=registry)
    finally:
        torch.random.set_rng_state(generator_state)
    state = modapt.state_of(model)
    if state.attachments or state.modules_to_save:
        what = sorted(state.attachments) or sorted(state.modules_to_save)
        raise AdapterSetError(f"--adapters-as-inputs takes weight adapters only; '{what[0]}' is an attention/module "
                              "adapter or modules_to_save (export those merged, one graph per adapter)")
    layer_paths = sorted(state.layers)
    _check_identity(model, state)
    defaults = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}
    out = AdapterSet(names, recipe, defaults=defaults)
    for name, src in zip(names, sources):
        tensors = src.tensors
        for key in [*defaults, *sorted(set(tensors) - set(defaults))]:  # the model's layer order first
            layer = _layer_of(key, layer_paths)
            if key not in tensors:
                raise AdapterSetError(f"adapter '{name}' has no tensor '{key}' for layer '{layer}': every adapter of "
                                      "one export must target the same layers")
            if key not in defaults:
                raise AdapterSetError(f"adapter '{name}' has tensor '{key}' (layer '{layer}') that the shared recipe "
                                      f"does not create: its targets differ from '{names[0]}'")
            if tuple(tensors[key].shape) != tuple(defaults[key].shape):
                raise AdapterSetError(f"adapter '{name}', layer '{layer}': '{key}' has shape {list(tensors[key].shape)}, "
                                      f"the other adapters {list(defaults[key].shape)} (ranks must match per layer)")
        out.tensors[name] = {k: _as_input(tensors[k].to(defaults[k].dtype).reshape(defaults[k].shape or (1,)))
                             for k in defaults}
    out.scalars = {k for k, v in defaults.items() if v.dim() == 0}
    out.casts = {k: v.dtype for k, v in defaults.items() if not v.is_floating_point()}
    out.defaults = {k: _as_input(v.reshape(v.shape or (1,))) for k, v in defaults.items()}
    # same layers and shapes; what else differs (LoRA's alpha: a constant of the graph) is refused too
    for name, src in zip(names[1:], sources[1:]):
        diff = _first_recipe_difference(_strip_init(first), _strip_init(src.recipe.to_dict()))
        if diff:
            raise AdapterSetError(f"adapter '{name}' has another recipe than '{names[0]}' at {diff}: adapters exported "
                                  "as inputs of one graph share methods, targets, ranks and scaling")
    return out


def _as_input(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as ``AdapterFormat`` stores it: floating dtypes kept, others (bool, int) as float32."""
    return tensor if tensor.is_floating_point() else tensor.to(torch.float32)


@torch.no_grad()
def _check_identity(model: nn.Module, state) -> None:
    """Each adapted layer at its defaults must compute its base layer (else "no adapter" would not
    be the base model)."""
    for path, host in state.layers.items():
        base = host.base_layer
        w = getattr(base, "weight", None)
        if w is None or w.dim() != 2 or not w.is_floating_point():
            continue
        if isinstance(base, nn.Embedding):  # integer inputs; LoRA's zero B covers it like a linear layer
            continue
        in_features = w.shape[1] if isinstance(base, nn.Linear) else w.shape[0]  # GPT-2's Conv1D: [in, out]
        x = torch.randn(3, in_features, generator=torch.Generator().manual_seed(0)).to(w.dtype)
        want, got = base(x), host(x)
        if not torch.allclose(want, got, rtol=1e-5, atol=1e-5 * float(want.abs().max())):
            raise AdapterSetError(f"layer '{path}': the recipe's initialisation is not the identity, so the graph's "
                                  "'no adapter' default would not be the base model")


class AdapterInputsWrapper(nn.Module):
    """``(*task inputs, *adapter tensors)`` -> the task wrapper's outputs, with the adapter tensors
    substituted for the model's adapter parameters (``torch.func.functional_call``)."""

    def __init__(self, inner: nn.Module, n_task_inputs: int, names: list[str], scalars: set[str] = frozenset(),
                 casts: dict | None = None):
        super().__init__()
        self.inner = inner
        self.n_task_inputs = n_task_inputs
        self.names = [f"model.{n}" for n in names]  # the task wrapper holds the model as ``.model``
        self.scalar = [n in scalars for n in names]
        self.cast = [(casts or {}).get(n) for n in names]

    def forward(self, *flat):
        task_inputs, tensors = flat[: self.n_task_inputs], flat[self.n_task_inputs:]
        tensors = [t.reshape(()) if s else t for t, s in zip(tensors, self.scalar)]
        tensors = [t if c is None else (t != 0 if c == torch.bool else t.to(c)) for t, c in zip(tensors, self.cast)]
        return torch.func.functional_call(self.inner, dict(zip(self.names, tensors)), task_inputs, strict=False)


def add_defaults(proto, adapters: AdapterSet) -> None:
    """Give every adapter input an initializer of its name holding its default (in place)."""
    from onnx import numpy_helper

    inputs = {i.name for i in proto.graph.input}
    for name, tensor in adapters.defaults.items():
        if name not in inputs:
            raise modapt.ModaptError(f"the traced graph has no input '{name}'")
        array = tensor.detach().cpu()
        if array.dtype == torch.bfloat16:
            raise modapt.ModaptError("--adapters-as-inputs supports fp32 and fp16 graphs (numpy has no bfloat16)")
        proto.graph.initializer.append(numpy_helper.from_array(array.numpy(), name))


def write_adapter_files(out_dir: Path, adapters: AdapterSet) -> dict[str, str]:
    """``out_dir/adapters/<name>.onnx_adapter`` per adapter (``onnxruntime.AdapterFormat``).
    Returns ``{name: relative path}``."""
    from .ort_model import import_onnxruntime

    ort = import_onnxruntime()
    folder = out_dir / ADAPTERS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in adapters.names:
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_model_version(1)
        fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v.detach().cpu().contiguous().numpy())
                            for k, v in adapters.tensors[name].items()})
        path = folder / f"{name}{ADAPTER_SUFFIX}"
        fmt.export_adapter(str(path))
        written[name] = f"{ADAPTERS_DIR}/{name}{ADAPTER_SUFFIX}"
    return written


def run_options_for(adapter_file: Path):
    """(``onnxruntime.RunOptions`` with the adapter in ``adapter_file`` active, the ``LoraAdapter``)."""
    from .ort_model import import_onnxruntime

    ort = import_onnxruntime()
    adapter = ort.LoraAdapter()
    adapter.Load(str(adapter_file))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    return options, adapter  # the caller keeps ``adapter`` alive while ``options`` is used


@torch.no_grad()
def load_into(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy one adapter's tensors into the template model's adapter parameters."""
    targets = adapter_state_dict(model)
    for k, v in tensors.items():
        targets[k].copy_(v.reshape(targets[k].shape).to(targets[k].dtype))
