"""Held-out perplexity results stored in the repository: ``sim/lm/results/perplexity.json``.

The trained Shakespeare model (``make model``: 36 minutes of training on this machine) is not committed
(13 MB of weights), and its perplexity rows take minutes more; a fresh clone would otherwise have no
figures at all. So ``make bench`` (module ``lowprec``) stores the rows it computes, with what they came
from, and a clone without the weights reports the stored rows, marked as such:

* ``weights_sha256``: the sha256 of the safetensors file the rows were computed on (and ``train_sha256``,
  the sha256 of the training code that produced it: ``sim/lm/train.py``, ``model.py``, ``data.py``);
* ``code_sha256``: the sha256 of the code that computes the rows (:data:`CODE_FILES`: the perplexity
  harness, the float64 reference, the quantisers and the golden numerics, the SoC's functional model and the
  compiler), with the list of files;
* the command and the date.

A stored record is *current* when ``code_sha256`` equals that of the present tree (and, when the weights
are present, ``weights_sha256`` equals theirs), *stale* otherwise: still reported, marked stale, with the
reason. Nothing here computes a perplexity.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STORE = Path(__file__).resolve().parent / "results" / "perplexity.json"
SCHEMA = 1
COMMAND = "make model && python -m sim.bench --only lowprec"

TRAIN_FILES = ("sim/lm/train.py", "sim/lm/model.py", "sim/lm/data.py")
CODE_FILES = ("sim/lm/perplexity.py", "sim/lm/model.py", "sim/lm/data.py", "sim/lm/reference.py",
              "sim/benchmarks/lowprec.py", "firmware/quant.py", "firmware/compiler.py", "firmware/program.py",
              "firmware/memory_plan.py", "firmware/runtime.py", "firmware/pim.py", "sim/soc_model.py")
CODE_DIRS = ("hw/spec", "sim/golden")


def _files(names, dirs=()) -> list[Path]:
    out = [ROOT / n for n in names]
    for d in dirs:
        out += sorted((ROOT / d).glob("*.py"))
    return out


def files_sha256(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(Path(p).relative_to(ROOT)).encode() + b"\0")
        h.update(Path(p).read_bytes() if Path(p).exists() else b"(missing)")
        h.update(b"\0")
    return h.hexdigest()


def code_sha256() -> str:
    return files_sha256(_files(CODE_FILES, CODE_DIRS))


def train_sha256() -> str:
    return files_sha256(_files(TRAIN_FILES))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _essential(rows):
    """The rows without their wall times (what decides whether a new record differs)."""
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def save(rows: list[dict], weights: Path, store: Path | None = None) -> bool:
    """Store ``rows`` (computed on ``weights``) unless the stored record already says the same. Returns
    whether the file was written."""
    rec = {"schema": SCHEMA, "weights": str(weights), "weights_sha256": file_sha256(weights),
           "train_sha256": train_sha256(), "code_sha256": code_sha256(),
           "code_files": [str(p.relative_to(ROOT)) for p in _files(CODE_FILES, CODE_DIRS)],
           "command": COMMAND, "rows": rows}
    store = store or STORE
    old = load(store)
    if old is not None and all(old.get(k) == rec[k] for k in ("weights_sha256", "train_sha256", "code_sha256")) \
            and _essential(old.get("rows", [])) == _essential(rows):
        return False
    rec["date"] = datetime.date.today().isoformat()
    store.parent.mkdir(parents=True, exist_ok=True)
    store.write_text(json.dumps(rec, indent=1) + "\n")
    return True


def load(store: Path | None = None) -> dict | None:
    store = store or STORE
    return json.loads(store.read_text()) if store.exists() else None


def rel(path: Path) -> str:
    """``path`` relative to the repository when it is inside it."""
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return str(path)


def status(rec: dict | None, weights: Path | None = None) -> tuple[str, str | None]:
    """(``stored`` | ``stale`` | ``missing``, reason) of a record against the present tree (and weights)."""
    if rec is None:
        return "missing", None
    if rec.get("schema") != SCHEMA:
        return "stale", f"schema {rec.get('schema')} (this code reads {SCHEMA})"
    reasons = []
    if rec.get("code_sha256") != code_sha256():
        reasons.append("the code computing the rows changed")
    if weights is not None and weights.exists() and rec.get("weights_sha256") != file_sha256(weights):
        reasons.append("computed on other weights")
    return ("stale", "; ".join(reasons)) if reasons else ("stored", None)
