"""The study's plan as data: presets (TOML files, loaded into frozen dataclasses that check themselves), arms
and trials.

A *trial* is one arm at one hyper-parameter on one split: (arm, method, heads, alpha|tau, split). Its
result is a JSON file whose path is derived from the trial alone, so resume, reports and statistics all
read the store and nothing recomputes what is stored.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from locaudit.config import DataConfig, ModelConfig
from locaudit.data.examples import PROBE_FORMATS
from locaudit.data.formats import FORMATS
from locaudit.errors import LocauditError
from locaudit.heads import Head, HeadSet, all_heads, random_heads, single_head
from locaudit.interventions import PLACEMENTS
from locaudit.methods import METHODS, Method
from locaudit.packing import check_mode as check_packing
from locaudit.training import FitConfig

PRESET_DIR = Path(__file__).parents[1] / "presets"


@dataclass(frozen=True)
class StudySettings:
    top_k: int = 16
    n_random_sets: int = 16
    n_single: int = 24
    alphas: tuple[float, ...] = (5.0, 10.0, 15.0, 20.0, 25.0)
    taus: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
    max_val_questions: int | None = None
    max_test_questions: int | None = None
    probe_format: str = "iti_end_q"
    n_boot: int = 2000
    # also fit the paper's reparameterised edit with S = every head (its "all heads" IPO curve), beside the plain
    # full rank-1 LoRA of full alignment
    all_heads_arm: bool = False
    # how an arm's tau grid is fitted: "auto" times one grid one by one and packed on the device and packs when that
    # is >= 1.2x faster (`locaudit.packing`); "on" / "off" pin it (results agree to float rounding either way)
    packing: str = "auto"

    def __post_init__(self):
        for name in ("top_k", "n_boot"):
            if getattr(self, name) <= 0:
                raise LocauditError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("n_random_sets", "n_single"):
            if getattr(self, name) < 0:
                raise LocauditError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_val_questions", "max_test_questions"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise LocauditError(f"{name} must be positive (or left out: every question), got {getattr(self, name)}")
        if not self.alphas or not self.taus:
            raise LocauditError("alphas and taus need at least one value each")
        for a in self.alphas:
            if not math.isfinite(a):
                raise LocauditError(f"every alpha must be a finite number, got {a}")
        for t in self.taus:
            if not t > 0:
                raise LocauditError(f"every tau must be > 0, got {t}")
        check_packing(self.packing)
        if self.probe_format not in PROBE_FORMATS:
            raise LocauditError(f"probe_format = {self.probe_format!r} is not a probe format; use one of "
                                f"{', '.join(PROBE_FORMATS)}")


@dataclass(frozen=True)
class EvalSettings:
    fmt: str = "qa"
    max_new_tokens: int = 50
    batch_size: int = 16
    judge: str = "default"
    mc: bool = True
    text_source: str = "wiki"
    text_docs: int = 100
    text_tokens: int = 128
    # where ITI adds its shift: "iti" as ITI's own code (last prompt token and generated tokens in generation,
    # answer tokens in MC, every position for CE/KL), or "all" (every position, the instruction prefix included)
    iti_placement: str = "iti"
    # score validation trials on MC and CE/KL too (the paper's KL-vs-MC trade-off curves over the grids); off by
    # default: validation trials only choose the hyper-parameter, by True*Info
    val_side_metrics: bool = False

    def __post_init__(self):
        if self.iti_placement not in PLACEMENTS:
            raise LocauditError(f"iti_placement must be one of {', '.join(PLACEMENTS)}, got {self.iti_placement!r}")
        if self.fmt not in FORMATS:
            raise LocauditError(f"fmt = {self.fmt!r} is not a prompt format; use one of {', '.join(FORMATS)}")
        for name in ("max_new_tokens", "batch_size", "text_tokens"):
            if getattr(self, name) <= 0:
                raise LocauditError(f"{name} must be positive, got {getattr(self, name)}")
        if self.text_docs < 0:
            raise LocauditError(f"text_docs must be >= 0 (0 skips CE/KL), got {self.text_docs}")


@dataclass(frozen=True)
class Preset:
    name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    study: StudySettings = field(default_factory=StudySettings)
    fit: FitConfig = field(default_factory=FitConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def as_dict(self) -> dict:
        return asdict(self)


def _type_ok(value, annotation: str) -> bool:
    """Whether a value read from TOML or JSON matches a dataclass field's (string) annotation: int, float, str,
    bool, `X | None`, `tuple[float, ...]`."""
    annotation = annotation.replace(" ", "")
    if annotation.endswith("|None"):
        return value is None or _type_ok(value, annotation[: -len("|None")])
    if annotation.startswith("tuple[") and annotation.endswith(",...]"):
        return isinstance(value, tuple) and all(_type_ok(v, annotation[6:-5]) for v in value)
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation == "str":
        return isinstance(value, str)
    return True


_WANT = {"int": "an integer", "float": "a number", "str": "text", "bool": "true or false",
         "tuple[float, ...]": "a list of numbers, e.g. [5.0, 15.0]"}


def build_settings(cls, table: dict, where: str):
    """One settings dataclass from a table of a preset file (or of a run's config.json): unknown names and
    values of the wrong type are refused here (TOML can give text where a number belongs); ranges and choices
    are the dataclass's own checks, reported with `where` (file and table) in front."""
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise LocauditError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    for k, v in kw.items():
        annotation = str(names[k].type)
        if not _type_ok(v, annotation):
            base = annotation.replace(" | None", "")
            raise LocauditError(f"{where} {k} = {v!r}: expected {_WANT.get(base, base)}; fix it in that file")
    try:
        return cls(**kw)
    except LocauditError as e:
        raise LocauditError(f"{where}: {e}") from None


def load_preset(name_or_path: str) -> Preset:
    """A preset by name (`smoke`, `quick`, `paper`) or a path to a TOML file with the same tables."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.toml")))
        raise LocauditError(f"unknown preset '{name_or_path}'; use one of {known} or a .toml file")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise LocauditError(f"{path} is not valid TOML ({e})") from None
    unknown = sorted(set(table) - {"model", "data", "study", "fit", "eval"})
    if unknown:
        raise LocauditError(f"{path}: unknown table(s) {', '.join(unknown)}; use model, data, study, fit, eval")
    return Preset(
        name=path.stem,
        model=build_settings(ModelConfig, table.get("model", {}), f"{path} [model]"),
        data=build_settings(DataConfig, table.get("data", {}), f"{path} [data]"),
        study=build_settings(StudySettings, table.get("study", {}), f"{path} [study]"),
        fit=build_settings(FitConfig, table.get("fit", {}), f"{path} [fit]"),
        eval=build_settings(EvalSettings, table.get("eval", {}), f"{path} [eval]"),
    )


@dataclass(frozen=True)
class Arm:
    """One edited (or unedited) configuration whose best hyper-parameter is chosen on validation."""

    name: str  # e.g. iti-top16, ipo-random16-s3, full, ipo-single-L4H2, baseline
    method: Method  # one of `methods.METHODS`
    group: str  # baseline | top | random | full | all-heads | single-random | single-best
    heads: HeadSet | None

    def grid(self, study: StudySettings) -> tuple[float | None, ...]:
        """The hyper-parameter values this arm tries on validation."""
        return self.method.grid(study)


def plan_arms(study: StudySettings, ranking: list[Head], n_layers: int, n_heads: int, seed: int) -> list[Arm]:
    """Every arm of the paper's protocol, in run order. Random sets are `random_heads(K, seed + i)`; single
    heads are the distinct heads of `random_heads(n_single, seed + 10_000)` plus the best probe head."""
    none, iti, ipo, full = (METHODS[k] for k in ("none", "iti", "ipo", "full"))
    top = HeadSet(tuple(ranking[: study.top_k]), f"top{study.top_k}")
    randoms = [random_heads(study.top_k, seed + i, n_layers, n_heads) for i in range(study.n_random_sets)]
    arms = [Arm("baseline", none, "baseline", None), Arm(f"iti-{top.label}", iti, "top", top)]
    arms += [Arm(f"iti-{r.label}", iti, "random", r) for r in randoms]
    arms += [Arm(f"ipo-{top.label}", ipo, "top", top)]
    arms += [Arm(f"ipo-{r.label}", ipo, "random", r) for r in randoms]
    arms += [Arm("full", full, "full", None)]
    if study.all_heads_arm:
        arms += [Arm("ipo-allheads", ipo, "all-heads", all_heads(n_layers, n_heads))]
    best = single_head(ranking[0])
    arms += [Arm(f"ipo-{best.label}", ipo, "single-best", best)]
    if study.n_single:
        for h in random_heads(study.n_single, seed + 10_000, n_layers, n_heads):
            if h != ranking[0]:
                arms.append(Arm(f"ipo-{single_head(h).label}", ipo, "single-random", single_head(h)))
    return arms


def select_value(values: tuple[float | None, ...], val_rows: list[dict]) -> float | None:
    """The hyper-parameter with the best validation True*Info (ties: the earlier grid value)."""
    best = max(range(len(values)), key=lambda i: (val_rows[i]["truth_info"], -i))
    return values[best]


def trial_path(run_dir: Path, arm: Arm, value: float | None, split: str) -> Path:
    hp = "none" if value is None else f"{arm.method.hyper}{value:g}"
    return Path(run_dir) / "trials" / arm.name / f"{hp}.{split}.json"


def edit_dir(run_dir: Path, arm: Arm, tau: float) -> Path:
    return Path(run_dir) / "edits" / arm.name / f"tau{tau:g}"


def with_overrides(preset: Preset, **kw) -> Preset:
    """Command-line overrides: model/device/dtype/data_dir/limit_questions/seed/judge (None = keep)."""
    model = replace(preset.model, **{k: v for k, v in kw.items() if k in ("model", "device", "dtype") and v is not None})
    data = replace(preset.data, **{k: v for k, v in kw.items() if k in ("data_dir", "limit_questions", "seed") and v is not None})
    ev = replace(preset.eval, **({"judge": kw["judge"]} if kw.get("judge") is not None else {}))
    return replace(preset, model=model, data=data, eval=ev)
