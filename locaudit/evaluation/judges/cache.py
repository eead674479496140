"""The default judges' on-disk cache: built once, stored under cache_dir()/judges/<version>/ with checksums, and
named by a version that changes whenever the design, the training data, the backbone or the fitting code does."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from locaudit.data.truthfulqa import find_data_dir
from locaudit.errors import LocauditError
from locaudit.evaluation.judges.base import KINDS
from locaudit.evaluation.judges.data import HELDOUT_FRAC, LABEL_FILES, SEED
from locaudit.evaluation.judges.encoder import backbone_id, check_processes
from locaudit.evaluation.judges.minilm import DESIGN_VERSION, JudgeModel, MiniLMJudge, TextReps, train_default
from locaudit.storage import atomic_write, atomic_write_json, cache_dir, file_sha256, read_json, stable_hash

# The modules whose code decides what a build contains: any edit to them gives a new version (a new cache).
FIT_MODULES = ("base", "data", "encoder", "minilm")
# Builds made before the judges became a package were keyed by the sha256 of the single module judges.py. That
# code now lives, fitting the same numbers, in FIT_MODULES, whose digest was FIT_CODE_AT_SPLIT; while it still is,
# the version keeps the old key, so those builds stay valid. The first edit to FIT_MODULES ends this.
LEGACY_CODE_KEY = "67a1049d4d0527ad3a8508904bc8bcbcd36eb51f0c813c42cabe6da9ce8b62f2"
FIT_CODE_AT_SPLIT = "93dec46668ff26ab903b943e61a05b642f1adf69b58816e7bfcce26bc5eeb6a5"
# pickles of those builds name their classes after that module
_LEGACY_CLASSES = {("locaudit.evaluation.judges", "JudgeModel"): JudgeModel,
                   ("locaudit.evaluation.judges", "_Reps"): TextReps}
_FILES = ("truth.pkl", "info.pkl")


def fit_code_digest() -> str:
    """sha256 over the source files of FIT_MODULES."""
    here = Path(__file__).parent
    return stable_hash({m: file_sha256(here / f"{m}.py") for m in FIT_MODULES}, 64)


def code_key() -> str:
    digest = fit_code_digest()
    return LEGACY_CODE_KEY if digest == FIT_CODE_AT_SPLIT else digest


def _data_fingerprint(root: Path) -> dict:
    return {name: file_sha256(root / name) for name in ("TruthfulQA.csv", *LABEL_FILES.values()) if (root / name).is_file()}


def default_version(data_dir=None) -> str:
    """Identifies design + training data + backbone + the fitting code: changes whenever any of them does, so a
    cached build is never reused by code that would have fitted it differently."""
    import sklearn

    root = find_data_dir(data_dir)
    for name in LABEL_FILES.values():
        if not (root / name).is_file():
            raise LocauditError(f"{root / name} is missing; the judges need TruthfulQA's {name} in the data directory")
    key = {"design": DESIGN_VERSION, "data": _data_fingerprint(root), "backbone": backbone_id(), "seed": SEED,
           "heldout_frac": HELDOUT_FRAC, "sklearn": sklearn.__version__.split(".")[:2], "code": code_key()}
    return f"{DESIGN_VERSION}-{stable_hash(key, 12)}"


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        return _LEGACY_CLASSES.get((module, name)) or super().find_class(module, name)


def load_cached(path: Path) -> tuple[dict, dict] | None:
    """Load a cached build, or None if absent; a corrupt one raises ValueError."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        meta = read_json(manifest)
    except LocauditError as e:
        raise ValueError(str(e)) from None
    if not isinstance(meta, dict) or set(meta.get("sha256", {})) != set(_FILES):
        raise ValueError("manifest lacks checksums")
    models = {}
    for name in _FILES:
        f = path / name
        if not f.is_file() or file_sha256(f) != meta["sha256"][name]:
            raise ValueError(f"{name} is missing or its checksum does not match")
        with open(f, "rb") as fh:
            models[name[:-4]] = _Unpickler(fh).load()
    return models, meta["info"]


def save(path: Path, models: dict, infos: dict) -> None:
    """Write the build into a temporary sibling folder, then rename it into place (a crash leaves no partial cache)."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sums = {}
    for kind in KINDS:
        atomic_write(tmp / f"{kind}.pkl", lambda t, m=models[kind]: t.write_bytes(pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL)))
        sums[f"{kind}.pkl"] = file_sha256(tmp / f"{kind}.pkl")
    atomic_write_json(tmp / "manifest.json", {"sha256": sums, "info": infos})
    shutil.rmtree(path, ignore_errors=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def default_judges(data_dir=None, progress: bool = True, processes: int = 1) -> tuple[MiniLMJudge, MiniLMJudge]:
    """The (truth, info) default judges from the cache, built first (`train_default`, with `processes`) if absent
    or unreadable."""
    check_processes(processes)
    version = default_version(data_dir)
    path = cache_dir() / "judges" / version
    loaded = None
    try:
        loaded = load_cached(path)
    except Exception as e:  # noqa: BLE001 - any unreadable cache (bad pickle, bad checksum) is rebuilt
        tqdm.write(f"judge cache {path} is corrupt ({str(e)[:120]}); rebuilding it")
    if loaded is None:
        models, infos = train_default(data_dir, progress, processes)
        for kind in KINDS:
            infos[kind]["version"] = version
        save(path, models, infos)
    else:
        models, infos = loaded
    return tuple(MiniLMJudge(models[k], infos[k]) for k in KINDS)  # type: ignore[return-value]
