"""Stratified random samples of TruthfulQA: every prefix of the seeded order, and so every split part and every
`max_val_questions` / `max_test_questions` subset, holds Types and Categories in proportion."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from locaudit.data.truthfulqa import Question, composition, describe_composition, split_questions, stratified_order


def _fake(strata: list[tuple[str, str]]) -> list[Question]:
    return [Question(i, f"q{i}?", "a", ("a",), ("b",), category=c, type=t) for i, (t, c) in enumerate(strata)]


def _worst_prefix_deviation(qs, order, key) -> float:
    total = collections.Counter(key(q) for q in qs)
    seen = collections.Counter()
    worst = 0.0
    for n, i in enumerate(order, 1):
        seen[key(qs[i])] += 1
        worst = max(worst, max(abs(seen[k] - n * c / len(qs)) for k, c in total.items()))
    return worst


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["Adversarial", "Non-Adversarial"]), st.sampled_from("ABCDEFGH")),
                min_size=1, max_size=120), st.integers(0, 2**31 - 1))
def test_order_is_a_seeded_permutation_with_proportional_prefixes(strata, seed):
    qs = _fake(strata)
    order = stratified_order(qs, seed)
    assert sorted(order) == list(range(len(qs))) and order == stratified_order(qs, seed)
    # Types: within 1 + 2 * share of proportional in every prefix; categories within 1 + (#categories) * share
    assert _worst_prefix_deviation(qs, order, lambda q: q.type) < 2
    n_cats = max(len({c for t, c in strata if t == ty}) for ty, _ in strata)
    assert _worst_prefix_deviation(qs, order, lambda q: (q.type, q.category)) < 2 + n_cats


def test_truthfulqa_samples_match_the_population(questions):
    if len(questions) < 800:
        pytest.skip("needs the full TruthfulQA in ../shared")
    for seed in range(5):
        order = stratified_order(questions, seed)
        assert _worst_prefix_deviation(questions, order, lambda q: q.type) < 1.5
        assert _worst_prefix_deviation(questions, order, lambda q: q.category) < 3
    assert stratified_order(questions, 0) != stratified_order(questions, 1)
    # the quick preset's samples: 300 questions, then 20 validation and 40 test questions
    sp = split_questions(questions, seed=0, limit=300)
    share = sum(q.type == "Adversarial" for q in questions) / len(questions)  # 437 / 817
    for part, n in ((sp.val, 20), (sp.test, 40), (sp.test, 60), (sp.train, 180)):
        adv = composition(part[:n])["type"].get("Adversarial", 0)
        assert abs(adv - share * n) <= 2, (n, adv)
    assert len({q.category for q in sp.test[:40]}) >= 20  # spread over categories, not the first few in CSV order
    assert describe_composition(sp.test[:40]).startswith("n=40: Adversarial 2")


def test_split_parts_are_disjoint_and_cover_the_sample(questions):
    sp = split_questions(questions, seed=3, limit=min(100, len(questions)))
    ids = [q.id for part in (sp.train, sp.val, sp.test) for q in part]
    assert len(ids) == len(set(ids)) == min(100, len(questions))
    assert sp.meta["stratified_by"] == ["type", "category"]
    assert split_questions(questions, seed=3, limit=min(100, len(questions))).hash == sp.hash
