"""A mergekit YAML config read as the options of ``lifelong-delta merge``, for the methods both tools have.

mergekit (https://github.com/arcee-ai/mergekit) describes a merge as::

    merge_method: ties                  # task_arithmetic | ties | dare_linear | dare_ties
    base_model: org/base                # a folder or a hub id
    models:
      - model: org/math                 # a model equal to base_model is skipped, as mergekit skips it
        parameters: {weight: 1.0, density: 0.5}
      - model: org/code
        parameters: {weight: 0.5, density: 0.5}
    parameters: {normalize: true, lambda: 1.0}   # also weight/density defaults for every model
    dtype: bfloat16                     # out_dtype, if given, wins

It means here what it means in mergekit: a parameter left out takes mergekit's default for that method (``weight``
is required, ``density`` 1, ``lambda`` 1, ``normalize`` true for ties and false for the others, DARE-TIES
included), so a config gives the same merge in both tools, up to these documented differences:

* The DARE masks are this project's counter-hash masks (seeded by ``--seed``), not ``torch.bernoulli`` draws; the
  kept entries are scaled by ``1/density``, the DARE paper's rule (recent mergekit matches the L1 norm instead).
* Everything is computed in fp32; ``dtype``/``out_dtype`` only set the output's dtype (the base's by default).
* ``tokenizer_source: base`` copies the base model's config and tokenizer files; without it they come from the
  first model, as with the command-line flags.
* ``int8_mask`` (a memory setting) is accepted and ignored; a ``density`` under ``task_arithmetic`` is ignored with a
  note, as mergekit ignores it.

Other methods, ``slices``, per-layer parameter lists or filters, ``rescale: false`` and other tokenizer settings are
refused with a one-line ``ValueError`` naming the key. Paths are relative to the current folder, as in mergekit.
Standard library and PyYAML only: the command reads the config before any heavy import.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MERGEKIT_METHODS", "MergekitConfig", "load_mergekit_config"]

#: mergekit's ``merge_method`` -> (this project's ``--method``, mergekit's default ``normalize``).
MERGEKIT_METHODS: dict[str, tuple[str, bool]] = {
    "task_arithmetic": ("task-arithmetic", False),
    "ties": ("ties", True),
    "dare_linear": ("dare-linear", False),
    "dare_ties": ("dare-ties", False),
}
_TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
_GLOBAL_PARAMETERS = ("normalize", "lambda", "int8_mask", "rescale", "weight", "density")
_MODEL_PARAMETERS = ("weight", "density")
_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class MergekitConfig:
    """The ``lifelong-delta merge`` options a mergekit config stands for.

    Attributes:
        base: ``base_model``.
        models: The models to merge, in config order (the base left out).
        method: ``--method``.
        weights: One per model.
        density: One per model, or None for task arithmetic.
        lambda_: ``λ``.
        normalize: mergekit's ``normalize``, its default for the method filled in.
        dtype: Output dtype, or None for the base's.
        files_from: ``"base"`` or ``"first"``: where config and tokenizer files come from.
        notes: What was ignored, for the user.
    """

    base: str
    models: tuple[str, ...]
    method: str
    weights: tuple[float, ...]
    density: tuple[float, ...] | None
    lambda_: float
    normalize: bool
    dtype: str | None
    files_from: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    def flags(self) -> str:
        """The equivalent ``lifelong-delta merge`` flags (without ``--out``)."""
        parts = [
            "--base",
            str(self.base),
            "--models",
            *map(str, self.models),
            "--method",
            self.method,
            "--weights",
            *(f"{w:g}" for w in self.weights),
        ]
        parts += ["--density", *(f"{d:g}" for d in self.density)] if self.density else []
        parts += ["--lambda", f"{self.lambda_:g}", "--normalize", str(self.normalize).lower()]
        parts += ["--dtype", self.dtype] if self.dtype else []
        parts += ["--files_from", "base"] if self.files_from == "base" else []
        return shlex.join(parts)


def _number(where: str, value: Any) -> float:
    if isinstance(value, (list, dict)):
        raise ValueError(f"{where}: per-layer values (lists or filters) are not supported; give one number")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {value!r}")
    return float(value)


def _flag(where: str, value: Any) -> bool:
    """A mergekit switch: true/false, or a number read by its truth value as mergekit does (``normalize: 0.0``)."""
    if not isinstance(value, (bool, int, float)):
        raise ValueError(f"{where} must be true or false, got {value!r}")
    return bool(value)


def _mapping(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping of names to values, got {type(value).__name__}")
    return value


def _unknown(where: str, keys: Any, allowed: tuple[str, ...]) -> None:
    extra = [k for k in keys if k not in allowed]
    if extra:
        raise ValueError(
            f"{where}: {extra[0]!r} is not supported by lifelong-delta merge (it reads {', '.join(allowed)})"
        )


def _read(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"--mergekit_config {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"--mergekit_config {path}: not valid YAML{at}") from None
    if not isinstance(raw, dict):
        raise ValueError(
            f"--mergekit_config {path}: a mergekit config is a YAML mapping (merge_method, base_model, models, ...)"
        )
    return raw


def load_mergekit_config(path: str | os.PathLike[str]) -> MergekitConfig:
    """Read a mergekit YAML config.

    Raises:
        ValueError: one line, starting with ``--mergekit_config PATH:``, naming the key to fix.
    """
    path = os.fspath(path)
    raw = _read(path)
    at = f"--mergekit_config {path}"
    _unknown(at, raw, _TOP_KEYS)
    method_name = raw.get("merge_method")
    if method_name not in MERGEKIT_METHODS:
        raise ValueError(
            f"{at}: merge_method {method_name!r} is not one lifelong-delta merge runs (it runs "
            f"{', '.join(MERGEKIT_METHODS)})"
        )
    method, default_normalize = MERGEKIT_METHODS[method_name]
    base = raw.get("base_model")
    if not isinstance(base, str) or not base:
        raise ValueError(f"{at}: base_model is required (a folder or a hub id)")
    dtype = raw.get("out_dtype", raw.get("dtype"))
    if dtype is not None:
        dtype = str(dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ValueError(f"{at}: dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    files_from = "first"
    if "tokenizer_source" in raw:
        if raw["tokenizer_source"] != "base":
            raise ValueError(
                f"{at}: tokenizer_source {raw['tokenizer_source']!r} is not supported (only 'base'; "
                "without it the files of the first model are copied)"
            )
        files_from = "base"
    glob = _mapping(f"{at}: parameters", raw.get("parameters"))
    _unknown(f"{at}: parameters", glob, _GLOBAL_PARAMETERS)
    if "rescale" in glob and _flag(f"{at}: parameters.rescale", glob["rescale"]) != method.startswith("dare"):
        raise ValueError(
            f"{at}: parameters.rescale {glob['rescale']} is not supported for {method_name} (DARE "
            "merges rescale by 1/density, the others do not rescale)"
        )
    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{at}: models must be a non-empty list of {{model: ..., parameters: ...}}")
    models, weights, densities, notes = [], [], [], []
    for j, entry in enumerate(entries):
        where = f"{at}: models[{j}]"
        entry = _mapping(where, entry)
        _unknown(where, entry, ("model", "parameters"))
        model = entry.get("model")
        if not isinstance(model, str) or not model:
            raise ValueError(f"{where}.model is required (a folder or a hub id)")
        if model == base:
            notes.append(f"models[{j}] is the base model; skipped, as mergekit skips it")
            continue
        params = _mapping(f"{where}.parameters", entry.get("parameters"))
        _unknown(f"{where}.parameters", params, _MODEL_PARAMETERS)
        if "weight" not in params and "weight" not in glob:
            raise ValueError(f"{where}.parameters.weight is required (as in mergekit)")
        weight = params.get("weight", glob.get("weight"))
        density = params.get("density", glob.get("density", 1.0))
        models.append(model)
        weights.append(_number(f"{where}.parameters.weight", weight))
        densities.append(_number(f"{where}.parameters.density", density))
    if not models:
        raise ValueError(f"{at}: models lists only the base model; nothing to merge")
    if method == "task-arithmetic" and any(d != 1.0 for d in densities):
        notes.append("density is ignored by task_arithmetic (as in mergekit)")
    return MergekitConfig(
        base=base,
        models=tuple(models),
        method=method,
        weights=tuple(weights),
        density=None if method == "task-arithmetic" else tuple(densities),
        lambda_=_number(f"{at}: parameters.lambda", glob.get("lambda", 1.0)),
        normalize=_flag(f"{at}: parameters.normalize", glob.get("normalize", default_normalize)),
        dtype=dtype,
        files_from=files_from,
        notes=tuple(notes),
    )
