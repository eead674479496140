"""The study's methods table (`locaudit.methods.METHODS`): names, grids from the study settings, stages, and
the edit each method builds; and the module layout: no import cycle anywhere in `locaudit`, and each study
module imports on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from locaudit.errors import LocauditError
from locaudit.heads import Head, parse_heads
from locaudit.interventions import ITI, FullRank1, LocalizedRank1, NoEdit
from locaudit.methods import METHODS, EditSource, fit_optimal_edit, method_of, value_of
from locaudit.probes import ProbeResult
from locaudit.study import StudySettings, plan_arms, trial_path
from locaudit.study.runner import STAGES
from locaudit.training import FitConfig
from tests.test_edits import toy_pairs

ROOT = Path(__file__).resolve().parents[1]


def test_table_names_and_properties():
    assert list(METHODS) == ["none", "iti", "ipo", "full"]  # stored in trial files and results.csv
    assert all(m.name == k for k, m in METHODS.items())
    got = {k: (m.hyper, m.stage, m.needs_fit, m.scope) for k, m in METHODS.items()}
    assert got == {"none": (None, "baseline", False, "none"), "iti": ("alpha", "iti", False, "heads"),
                   "ipo": ("tau", "ipo_eval", True, "heads"), "full": ("tau", "ipo_eval", True, "all")}
    assert all(m.stage in STAGES for m in METHODS.values())
    # the runner starts the costliest arms first: full alignment, localized fits, ITI, the baseline
    assert sorted(METHODS, key=lambda k: -METHODS[k].cost) == ["full", "ipo", "iti", "none"]


def test_grids_come_from_the_study_settings():
    study = StudySettings(alphas=(2.0, 7.5), taus=(0.3, 0.05, 1.0))
    assert METHODS["none"].grid(study) == (None,)
    assert METHODS["iti"].grid(study) == (2.0, 7.5)
    assert METHODS["ipo"].grid(study) == METHODS["full"].grid(study) == (0.3, 0.05, 1.0)


def test_arms_and_trial_paths_use_the_table(tmp_path):
    study = StudySettings(top_k=2, n_random_sets=1, n_single=1, alphas=(5.0, 15.0), taus=(0.1,))
    ranking = [Head(l, h) for l in range(3) for h in range(4)]
    arms = {a.name: a for a in plan_arms(study, ranking, 3, 4, seed=0)}
    assert arms["baseline"].method is METHODS["none"] and arms["full"].method is METHODS["full"]
    assert arms["iti-top2"].grid(study) == (5.0, 15.0) and arms["ipo-top2"].grid(study) == (0.1,)
    assert trial_path(tmp_path, arms["iti-top2"], 5.0, "val") == tmp_path / "trials" / "iti-top2" / "alpha5.val.json"
    assert trial_path(tmp_path, arms["full"], 0.1, "test") == tmp_path / "trials" / "full" / "tau0.1.test.json"
    assert trial_path(tmp_path, arms["baseline"], None, "test") == tmp_path / "trials" / "baseline" / "none.test.json"


def test_stored_rows_name_their_method():
    assert value_of({"method": "iti", "alpha": 5.0, "tau": None}) == 5.0
    assert value_of({"method": "full", "alpha": None, "tau": 0.2}) == 0.2
    assert value_of({"method": "none", "alpha": None, "tau": None}) is None
    with pytest.raises(LocauditError, match="unknown method 'kto'"):
        method_of({"arm": "x", "method": "kto"})


def _probes(lm, seed=0) -> ProbeResult:
    a = lm.arch
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(a.n_layers, a.n_heads, a.head_dim))
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    acc = rng.uniform(0.4, 0.9, size=(a.n_layers, a.n_heads))
    return ProbeResult(acc, acc, u.astype(np.float32), rng.uniform(0.5, 2.0, size=(a.n_layers, a.n_heads)), 10, 5)


def test_unedited_and_steering_edits(tiny_llama):
    lm = tiny_llama
    heads = parse_heads("L0H1,L2H3", 3, 4)
    probes = _probes(lm)
    src = EditSource(lm, probes=probes, placement="all")
    assert isinstance(METHODS["none"].build(src, None, None).edit, NoEdit)
    built = METHODS["iti"].build(src, heads, 7.5)
    assert isinstance(built.edit, ITI) and built.fit is None
    assert built.edit.alpha == 7.5 and built.edit.placement == "all" and built.edit.heads == heads
    assert torch.allclose(built.edit.u[1], torch.as_tensor(probes.directions[2, 3], dtype=torch.float32))
    assert torch.allclose(built.edit.sigma, torch.tensor([probes.sigmas[0, 1], probes.sigmas[2, 3]], dtype=torch.float32))
    with pytest.raises(LocauditError, match="ITI needs a head set and probe results"):
        METHODS["iti"].build(EditSource(lm), heads, 7.5)


def test_fitted_edits(tiny_llama):
    """ipo: a LocalizedRank1 at the arm's heads, trained at the grid value of tau; full: a FullRank1 on every
    layer whatever heads it is given; each is exactly `fit_optimal_edit` with that tau."""
    lm = tiny_llama
    heads = parse_heads("L1H0,L2H1", 3, 4)
    cfg = FitConfig(tau=0.1, epochs=2, batch_size=4, lr=1e-1, fmt="plain", retries=0)
    src = EditSource(lm, train_pairs=toy_pairs(12), val_pairs=toy_pairs(6, 100), fit=cfg, seed=3)
    ipo = METHODS["ipo"].build(src, heads, 0.5)
    assert isinstance(ipo.edit, LocalizedRank1) and ipo.edit.heads == heads
    assert ipo.fit.config.tau == 0.5 and ipo.fit.config.lr == 0.1
    assert ipo.fit.best["val_loss"] < ipo.fit.history[0]["val_loss"]  # it trained
    direct = fit_optimal_edit(lm, heads, src.train_pairs, src.val_pairs, replace(cfg, tau=0.5), seed=3, progress=False)
    assert all(torch.equal(ipo.edit.tensors()[k], v) for k, v in direct.edit.tensors().items())
    full = METHODS["full"].build(src, heads, 0.2)
    assert isinstance(full.edit, FullRank1) and full.edit.layers == [0, 1, 2] and full.fit.config.tau == 0.2
    with pytest.raises(LocauditError, match="edits a head set"):
        METHODS["ipo"].build(src, None, 0.5)


# ---------------------------------------------------------------------------------------------- module layout

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the locaudit modules it imports}, from every import statement (module level or inside a
    function) of every module of the package."""
    modules = {_module_name(p): p for p in (ROOT / "locaudit").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from locaudit.x import y`: y is a module (locaudit.x.y) or a name of locaudit.x
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    graph = import_graph()
    assert {"locaudit.study.plan", "locaudit.study.runner", "locaudit.study.protocol", "locaudit.stages",
            "locaudit.methods"} <= set(graph)
    assert graph["locaudit.study.runner"] >= {"locaudit.study.plan", "locaudit.methods", "locaudit.stages"}
    assert cycles(graph) == []
    # the cycle finder finds one when there is one
    assert cycles({**graph, "locaudit.methods": graph["locaudit.methods"] | {"locaudit.study.protocol"}})


def test_each_module_imports_alone():
    """Each entry module in a fresh interpreter, with nothing imported before it (a spawned worker starts by
    importing `locaudit.study.runner`, which first runs the package `locaudit.study`: plan, runner, protocol)."""
    modules = ["locaudit.methods", "locaudit.stages", "locaudit.study.runner", "locaudit.cli"]
    # whatever is imported first, load_intervention's table is complete (heuristics registers "meandiff")
    code = {m: f"import {m}; import locaudit.interventions as i; assert 'meandiff' in i._LOADERS, sorted(i._LOADERS)"
            for m in modules}
    procs = {m: subprocess.Popen([sys.executable, "-c", c], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
             for m, c in code.items()}
    for m, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (m, err[-2000:])
