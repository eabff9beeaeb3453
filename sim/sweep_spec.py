"""The spec of an ``ianus sweep`` (YAML): parsing, checks, points and their stable keys.

The format is described in :mod:`sim.sweep`. Everything wrong in a spec raises :class:`SpecError` with one
line naming the field, the value and the rule, before anything runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from hw.config import PRESETS, ConfigError, SystemConfig, preset
from sim.usage import UsageError

__all__ = ["SpecError", "Axis", "Spec", "parse_spec", "load_spec", "point_key", "resolve_model", "build_config",
           "WORKLOAD_AXES", "METRICS"]

WORKLOAD_AXES = ("model", "policy", "input", "output")
DEFAULTS = {"policy": "ianus", "input": 128, "output": 8}
PARTS = ("pim", "timing", "npu", "clocks")
TOP_KEYS = ("name", "base", "mode", "samples", "seed", "positions", "timeout_s", "fixed", "axes")
MAX_POINTS = 1_000_000
MAX_TOKENS = 65_536
MAX_POSITIONS = 64
MAX_CHECKED = 1000
METRICS = ("ms_per_token", "mJ_per_token", "area_mm2", "summarization_ms", "gen_ms_per_token", "total_ms",
           "summarization_mJ", "gen_mJ_per_token", "total_J", "area_pim_mm2", "area_npu_mm2", "area_sram_mm2",
           "sram_mib")


class SpecError(UsageError):
    """A sweep spec or option is wrong; the message is one line naming the field, the value and the rule
    (``ianus`` prints it and exits with status 2)."""


# ---------------------------------------------------------------------------------------------
# Spec
# ---------------------------------------------------------------------------------------------

def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Axis:
    """One varied field: explicit ``values``, a ``range`` (lo, hi, optional step, log) or ``pow2``."""

    name: str
    values: tuple | None = None
    lo: float | None = None
    hi: float | None = None
    step: float | None = None
    log: bool = False

    @property
    def integer(self) -> bool:
        return all(_is_int(x) for x in (self.lo, self.hi) + ((self.step,) if self.step is not None else ()))

    def grid(self) -> list:
        if self.values is not None:
            return list(self.values)
        if self.step is None:
            raise SpecError(f"axis {self.name}: a grid needs a list, {{range: [lo, hi], step: s}} or "
                            f"{{pow2: [lo, hi]}}, not a range without step")
        n = int(math.floor((self.hi - self.lo) / self.step + 1e-9)) + 1
        vals = [self.lo + i * self.step for i in range(n)]
        return vals if self.integer else [round(v, 12) for v in vals]

    def draw(self, rng: random.Random):
        if self.values is not None or self.step is not None:
            return rng.choice(self.grid())
        if self.log:
            v = math.exp(rng.uniform(math.log(self.lo), math.log(self.hi)))
        else:
            v = rng.uniform(self.lo, self.hi)
        return int(round(v)) if self.integer else float(f"{v:.6g}")

    def count(self) -> int:
        """Values in a grid (without building a long one); a range without step has none."""
        if self.values is not None:
            return len(self.values)
        if self.step is None:
            self.grid()                 # raises the grid error
        return int(math.floor((self.hi - self.lo) / self.step + 1e-9)) + 1

    def checked_values(self) -> list:
        """The values checked at load time: every value of a list or a grid of at most
        :data:`MAX_CHECKED`, else the ends of the range."""
        if self.values is not None:
            return list(self.values)
        if self.step is not None and self.count() <= MAX_CHECKED:
            return self.grid()
        return [self.lo, self.hi]


def _parse_axis(name: str, raw) -> Axis:
    if isinstance(raw, list):
        if not raw:
            raise SpecError(f"axis {name}: needs at least one value, not an empty list")
        return Axis(name, values=tuple(raw))
    if not isinstance(raw, dict):
        return Axis(name, values=(raw,))
    if name == "model" and "d_model" in raw:
        return Axis(name, values=(raw,))
    unknown = set(raw) - {"range", "step", "log", "pow2"}
    if unknown:
        raise SpecError(f"axis {name}: unknown key {sorted(unknown)[0]!r} (a list, {{range: [lo, hi], step, log}} "
                        f"or {{pow2: [lo, hi]}})")
    if "pow2" in raw:
        lo, hi = _pair(name, "pow2", raw["pow2"])
        if not (_is_int(lo) and _is_int(hi)) or lo < 1:
            raise SpecError(f"axis {name}: pow2 bounds must be integers of at least 1, not {raw['pow2']!r}")
        vals = tuple(1 << k for k in range(hi.bit_length() + 1) if lo <= 1 << k <= hi)
        if not vals:
            raise SpecError(f"axis {name}: no power of two in pow2 {raw['pow2']!r}")
        return Axis(name, values=vals)
    if "range" not in raw:
        raise SpecError(f"axis {name}: a mapping needs 'range' or 'pow2', not {sorted(raw)!r}")
    lo, hi = _pair(name, "range", raw["range"])
    step = raw.get("step")
    if step is not None and (not _is_num(step) or step <= 0):
        raise SpecError(f"axis {name}: step must be a positive number, not {step!r}")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise SpecError(f"axis {name}: log must be true or false, not {log!r}")
    if log and (lo <= 0 or step is not None):
        raise SpecError(f"axis {name}: log needs a positive range without step, not {raw!r}")
    return Axis(name, lo=lo, hi=hi, step=step, log=log)


def _pair(name, key, raw):
    if not (isinstance(raw, list) and len(raw) == 2 and all(_is_num(x) for x in raw) and raw[0] <= raw[1]):
        raise SpecError(f"axis {name}: {key} must be [lo, hi] with numbers lo <= hi, not {raw!r}")
    return raw[0], raw[1]


def _check_name(name: str):
    if name in WORKLOAD_AXES:
        return
    part, dot, sub = name.partition(".")
    if not dot:
        raise SpecError(f"axis {name!r}: not one of {', '.join(WORKLOAD_AXES)} nor a configuration field "
                        f"({', '.join(p + '.*' for p in PARTS)})")
    if part not in PARTS:
        raise SpecError(f"axis {name!r}: {part!r} is not a configuration part (one of {', '.join(PARTS)})")
    cls = type(getattr(SystemConfig(), part))
    names = [f for f in cls.__dataclass_fields__]
    if sub not in names:
        raise SpecError(f"axis {name!r}: {cls.__name__} has no field {sub!r} (fields: {', '.join(names)})")


def resolve_model(value):
    """(GptShape, label) of a model value: a :data:`firmware.gpt2.SHAPES` name or a dict of GptShape fields."""
    from firmware.gpt2 import SHAPES, GptShape, WeightsError

    if isinstance(value, str):
        if value not in SHAPES:
            raise SpecError(f"model must be one of {', '.join(SHAPES)} or {{d_model, heads, layers}}, not {value!r}")
        return SHAPES[value], value
    if isinstance(value, dict):
        allowed = {"d_model", "heads", "layers"}
        if set(value) - allowed or not {"d_model", "heads"} <= set(value) \
                or not all(_is_int(v) for v in value.values()):
            raise SpecError(f"model must be a name or integers {{d_model, heads[, layers]}}, not {value!r}")
        try:
            shape = GptShape(**value)
        except WeightsError as e:
            raise SpecError(f"model {value!r}: {e}") from None
        return shape, f"d{shape.d_model}h{shape.heads}l{shape.layers}"
    raise SpecError(f"model must be one of {', '.join(SHAPES)} or {{d_model, heads, layers}}, not {value!r}")


def _check_workload(name: str, value):
    from firmware.compiler import POLICIES

    if name == "model":
        resolve_model(value)
    elif name == "policy":
        if value not in POLICIES:
            raise SpecError(f"policy must be one of {', '.join(POLICIES)}, not {value!r}")
    elif not _is_int(value) or not 1 <= value <= MAX_TOKENS:
        raise SpecError(f"{name} must be an integer in 1..{MAX_TOKENS} (tokens), not {value!r}")


def _config_changes(point: dict) -> dict:
    return {k: v for k, v in point.items() if "." in k}


def build_config(base: str, point: dict) -> SystemConfig:
    """The base preset with the point's configuration fields replaced (raises ConfigError)."""
    changes = _config_changes(point)
    return preset(base).replace(**changes) if changes else preset(base)


@dataclass(frozen=True)
class Spec:
    name: str
    base: str
    mode: str
    axes: tuple
    fixed: dict = field(default_factory=dict)
    samples: int = 0
    seed: int = 0
    positions: int = 4
    timeout_s: float = 300.0

    @property
    def fields(self) -> list[str]:
        """Point fields in column order: the workload, then configuration fields."""
        names = list(WORKLOAD_AXES)
        for n in list(self.fixed) + [a.name for a in self.axes]:
            if n not in names:
                names.append(n)
        return names

    @property
    def design_fields(self) -> list[str]:
        """The varied fields that are not the workload (the design in the best-point table)."""
        return [a.name for a in self.axes if a.name not in ("model", "input", "output")]

    def columns(self) -> list[str]:
        return ["key", "status", "error", *self.fields, *METRICS, "worker", "wall_s", "cpu_s", "point"]

    def _complete(self, values: dict) -> dict:
        point = dict(DEFAULTS)
        point.update(self.fixed)
        point.update(values)
        return point

    def points(self) -> list[dict]:
        """The sweep's points (grid order, or ``samples`` distinct random draws in draw order)."""
        if self.mode == "grid":
            names = [a.name for a in self.axes]
            return [self._complete(dict(zip(names, combo, strict=True)))
                    for combo in itertools.product(*(a.grid() for a in self.axes))]
        rng = random.Random(self.seed)
        seen, out = set(), []
        for _ in range(self.samples * 20):
            p = self._complete({a.name: a.draw(rng) for a in self.axes})
            k = point_key(self, p)
            if k not in seen:
                seen.add(k)
                out.append(p)
                if len(out) == self.samples:
                    break
        return out

    def size(self) -> int:
        if self.mode == "random":
            return self.samples
        return math.prod(a.count() for a in self.axes)


def point_key(spec: Spec, point: dict) -> str:
    """Stable hash of what determines a point's result: base preset, positions and the point."""
    text = json.dumps({"base": spec.base, "positions": spec.positions, "point": point}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_spec(raw, name: str = "sweep") -> Spec:
    """A :class:`Spec` from a parsed YAML mapping; :class:`SpecError` (one line) on anything wrong."""
    if not isinstance(raw, dict):
        raise SpecError(f"a spec must be a mapping with keys {', '.join(TOP_KEYS)}, not {type(raw).__name__}")
    for k in raw:
        if k not in TOP_KEYS:
            raise SpecError(f"unknown spec key {k!r} (known: {', '.join(TOP_KEYS)})")
    base = raw.get("base", "ianus")
    if base not in PRESETS:
        raise SpecError(f"base must be one of {', '.join(PRESETS)}, not {base!r}")
    mode = raw.get("mode", "grid")
    if mode not in ("grid", "random"):
        raise SpecError(f"mode must be grid or random, not {mode!r}")
    positions = raw.get("positions", 4)
    if not _is_int(positions) or not 1 <= positions <= MAX_POSITIONS:
        raise SpecError(f"positions must be an integer in 1..{MAX_POSITIONS}, not {positions!r}")
    timeout_s = raw.get("timeout_s", 300.0)
    if not _is_num(timeout_s) or timeout_s <= 0:
        raise SpecError(f"timeout_s must be a positive number of seconds, not {timeout_s!r}")
    seed = raw.get("seed", 0)
    if not _is_int(seed):
        raise SpecError(f"seed must be an integer, not {seed!r}")
    samples = raw.get("samples", 0)
    if mode == "random" and (not _is_int(samples) or not 1 <= samples <= MAX_POINTS):
        raise SpecError(f"samples must be an integer in 1..{MAX_POINTS} in random mode, not {samples!r}")
    if mode == "grid" and "samples" in raw:
        raise SpecError("samples is for mode random; a grid runs every combination")
    fixed = raw.get("fixed") or {}
    axes_raw = raw.get("axes") or {}
    for key, val in (("fixed", fixed), ("axes", axes_raw)):
        if not isinstance(val, dict):
            raise SpecError(f"{key} must be a mapping of field: value(s), not {val!r}")
    if not axes_raw:
        raise SpecError("axes must name at least one field to vary")
    for n in list(fixed) + list(axes_raw):
        _check_name(str(n))
    both = set(fixed) & set(axes_raw)
    if both:
        raise SpecError(f"field {sorted(both)[0]} is both fixed and an axis")
    if "model" not in fixed and "model" not in axes_raw:
        raise SpecError("a spec needs a model (under fixed or axes)")
    axes = tuple(_parse_axis(n, v) for n, v in axes_raw.items())

    # Workload values; then configuration values against the base with the fixed values.
    for n, v in fixed.items():
        if n in WORKLOAD_AXES:
            _check_workload(n, v)
    for a in axes:
        if a.name in WORKLOAD_AXES:
            for v in a.checked_values():
                _check_workload(a.name, v)
    spec = Spec(name=str(raw.get("name", name)), base=base, mode=mode, axes=axes, fixed=dict(fixed),
                samples=samples if mode == "random" else 0, seed=seed, positions=positions,
                timeout_s=float(timeout_s))
    if mode == "grid" and spec.size() > MAX_POINTS:
        raise SpecError(f"the grid has {spec.size():,} points, more than the limit of {MAX_POINTS:,}")
    try:
        cfg = build_config(base, fixed)
    except (ConfigError, TypeError) as e:
        raise SpecError(f"fixed: {e}") from None
    _check_config_axes(cfg, [a for a in axes if "." in a.name])
    return spec


def _check_config_axes(cfg: SystemConfig, axes: list[Axis]):
    """Every value of a configuration axis must pass the configuration's rules with the base (and the
    fixed values), or with some values of the other configuration axes (a rule between two fields, such
    as column_bits = lanes x 16, is met by a pair): a value that passes with none is the spec's error."""
    for a in axes:
        others = [(b.name, b.checked_values()) for b in axes if b is not a]
        for v in a.checked_values():
            try:
                cfg.replace(**{a.name: v})
                continue
            except (ConfigError, TypeError) as e:
                first = e
            combos = itertools.islice(itertools.product(*(vals for _, vals in others)), MAX_CHECKED)
            for combo in combos:
                try:
                    cfg.replace(**{a.name: v}, **{n: x for (n, _), x in zip(others, combo, strict=True)})
                    break
                except (ConfigError, TypeError):
                    continue
            else:
                raise SpecError(f"axis {a.name} value {v!r}: {first}") from None


def load_spec(path) -> Spec:
    """Read and check a YAML spec file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"cannot read spec {str(path)!r}: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(f"{path}: YAML error{where}: {getattr(e, 'problem', None) or e}") from None
    return parse_spec(raw, name=path.stem)
