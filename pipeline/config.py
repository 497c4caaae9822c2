"""The stage's configuration: a YAML file, command-line overrides, checks.

Every key, its default and its meaning is listed in ``FIELDS``; the README
documents the same table.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
from typing import Any

import yaml

from transforms.errors import StageError


class ConfigError(StageError):
    """The configuration is missing, unreadable or holds a bad value."""


@dataclasses.dataclass(frozen=True)
class Config:
    """A checked configuration.

    Attributes:
        input: a Parquet file, a directory of them, or a glob.
        output_dir: where ``components/``, ``projected/`` and
            ``summary.json`` are written.
        key: the group-by column; None treats the input as one group.
        features: feature columns in order; None takes every numeric column
            that is neither the key nor passthrough.
        passthrough: columns copied unchanged into ``projected/``.
        ddof: the covariance divisor is n_rows - ddof; 0 or 1.
        n_components: principal axes kept per group; a fraction in (0, 1)
            keeps, per group, the fewest axes that explain at least that
            share of the variance.
        missing: "drop" leaves out a row with a null, NaN or infinite key or
            feature (counted); "error" stops the run at the first.
        dtype: "float64" or "float32", the dtype of the moments op.
        block_rows: most rows in one padded block.
        batch_blocks: blocks per ``tf.data`` batch.
        n_shards: shards of the key space the moments are merged in.
        overwrite: write into an output_dir that holds foreign files.
        mode: "fit_transform" fits bases and projects the input; "fit" only
            writes ``components/``; "transform" projects with the bases of
            an earlier run named by ``components``.
        components: an earlier run's output_dir (or its ``components/``
            folder), for ``mode: transform``.
        whiten: divide each score by the square root of its eigenvalue.
        reconstruction_error: add the squared distance between a row and its
            reconstruction from the kept axes.
        reconstruct: add the reconstructed features, ``<feature>_reconstructed``.
        export: also write a TensorFlow SavedModel of the bases.
        weight: a column of non-negative row weights (np.cov's aweights);
            rows of weight 0 are left out and counted.
        standardize: take the principal axes of the correlation matrix (PCA
            of standardised features) instead of the covariance.
    """

    input: str
    output_dir: str
    key: str | None = None
    features: tuple[str, ...] | None = None
    passthrough: tuple[str, ...] = ()
    ddof: int = 1
    n_components: int | float = 2
    missing: str = "drop"
    dtype: str = "float64"
    block_rows: int = 1024
    batch_blocks: int = 4096
    n_shards: int = 8
    overwrite: bool = False
    mode: str = "fit_transform"
    components: str | None = None
    whiten: bool = False
    reconstruction_error: bool = False
    reconstruct: bool = False
    export: bool = False
    weight: str | None = None
    standardize: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in ("features", "passthrough"):
            if data[name] is not None:
                data[name] = list(data[name])
        return data


FIELDS = [field.name for field in dataclasses.fields(Config)]
_SWITCHES = (
    "overwrite",
    "whiten",
    "reconstruction_error",
    "reconstruct",
    "export",
    "standardize",
)
_REQUIRED = ("input", "output_dir")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        msg = f"{name}={value!r} must be a positive integer"
        raise ConfigError(msg)
    if value <= 0:
        msg = f"{name}={value} must be a positive integer"
        raise ConfigError(msg)
    return int(value)


def _n_components(value: Any) -> int | float:
    if isinstance(value, float) and 0 < value < 1:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        msg = (
            f"n_components={value!r} must be a positive integer (axes kept) or a "
            "fraction between 0 and 1 (variance explained)"
        )
        raise ConfigError(msg)
    return int(value)


def _column_list(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        msg = f"{name}={value!r} must be a list of column names"
        raise ConfigError(msg)
    duplicates = sorted({v for v in value if value.count(v) > 1})
    if duplicates:
        msg = f"{name} names {duplicates[0]!r} more than once; list each column once"
        raise ConfigError(msg)
    return tuple(value)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        expected = " or ".join(repr(c) for c in choices)
        msg = f"{name}={value!r} must be {expected}"
        raise ConfigError(msg)
    return value


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        msg = f"{name}={value!r} must be a non-empty string"
        raise ConfigError(msg)
    return value


def check(raw: dict[str, Any]) -> Config:
    """Check a mapping of settings and return the configuration.

    Raises:
        ConfigError: a key is unknown or missing, or a value is out of range.
    """
    for name in raw:
        if name not in FIELDS:
            close = difflib.get_close_matches(str(name), FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            msg = f"config key {name!r} is not known{hint}; known keys: " + ", ".join(
                FIELDS
            )
            raise ConfigError(msg)
    for name in _REQUIRED:
        if raw.get(name) is None:
            msg = f"config key {name!r} is required"
            raise ConfigError(msg)

    values = dict(raw)
    values["input"] = _text("input", raw["input"])
    values["output_dir"] = _text("output_dir", raw["output_dir"])
    if raw.get("key") is not None:
        values["key"] = _text("key", raw["key"])
    if raw.get("features") is not None:
        values["features"] = _column_list("features", raw["features"])
        if not values["features"]:
            raise ConfigError("features=[] must name at least one column")
    values["passthrough"] = _column_list("passthrough", raw.get("passthrough") or [])
    if raw.get("weight") is not None:
        values["weight"] = _text("weight", raw["weight"])
        named = {values.get("key"), *(values.get("features") or ())}
        if values["weight"] in named:
            msg = (
                f"weight={values['weight']!r} is also the key or a feature; "
                "a weight column must be a column of its own"
            )
            raise ConfigError(msg)
    if (
        values.get("key")
        and values.get("features")
        and values["key"] in values["features"]
    ):
        msg = (
            f"key={values['key']!r} is also listed in features; "
            "a column is the key or a feature, not both"
        )
        raise ConfigError(msg)

    ddof = raw.get("ddof", 1)
    if isinstance(ddof, bool) or ddof not in (0, 1):
        msg = f"ddof={ddof!r} must be 0 (population) or 1 (sample)"
        raise ConfigError(msg)
    values["ddof"] = int(ddof)
    values["n_components"] = _n_components(raw.get("n_components", 2))
    for name in ("block_rows", "batch_blocks", "n_shards"):
        if name in raw:
            values[name] = _positive_int(name, raw[name])
    values["missing"] = _choice(
        "missing", raw.get("missing", "drop"), ("drop", "error")
    )
    values["dtype"] = _choice(
        "dtype", raw.get("dtype", "float64"), ("float64", "float32")
    )
    for name in _SWITCHES:
        switch = raw.get(name, False)
        if not isinstance(switch, bool):
            raise ConfigError(f"{name}={switch!r} must be true or false")

    values["mode"] = _choice(
        "mode", raw.get("mode", "fit_transform"), ("fit_transform", "fit", "transform")
    )
    if values["mode"] == "transform":
        if raw.get("components") is None:
            msg = (
                "mode='transform' needs components: the output_dir of an "
                "earlier run whose bases to project with"
            )
            raise ConfigError(msg)
        values["components"] = _text("components", raw["components"])
    elif raw.get("components") is not None:
        msg = (
            f"components={raw['components']!r} is used only with mode: transform; "
            f"mode is {values['mode']!r}"
        )
        raise ConfigError(msg)
    return Config(**values)


def load(path: str, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config file, apply overrides and check the result.

    Args:
        path: the YAML file.
        overrides: settings that replace the file's (None values are ignored).

    Raises:
        ConfigError: the file is missing or not YAML, or a setting is bad.
    """
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path!r} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path!r} cannot be read: {exc}") from exc
    except yaml.YAMLError as exc:
        # The first line of PyYAML's message says what is wrong, the mark where.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        msg = f"config file {path!r} is not valid YAML{where}: {problem}"
        raise ConfigError(msg) from exc

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        msg = f"config file {path!r} must hold a mapping of keys, got a {kind}"
        raise ConfigError(msg)
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return check(raw)
