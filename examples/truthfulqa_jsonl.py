"""Write TruthfulQA's preference pairs as a preference JSONL in TRL's standard format, to audit a claim on "your
own" data exactly as a user would (`locaudit audit --task FILE.jsonl`). Reads TruthfulQA in place (../shared or
--data-dir); the output stays outside the repository.

    python examples/truthfulqa_jsonl.py OUT.jsonl [--data-dir DIR] [--limit N] [--seed S]

One line per (truthful, untruthful) answer pair: {"prompt": "Q: <question>\\nA:", "chosen": " <truthful>",
"rejected": " <untruthful>", "group": "<Type>"} (the group stratifies the audit's split)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from locaudit.data.examples import preference_pairs
from locaudit.data.truthfulqa import load_truthfulqa, stratified_order


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--limit", type=int, default=None, help="a stratified random subset of questions")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    qs = load_truthfulqa(args.data_dir)
    order = stratified_order(qs, args.seed)
    qs = [qs[i] for i in (order[:args.limit] if args.limit else order)]
    types = {q.id: q.type for q in qs}
    pairs = preference_pairs(qs)
    kept = [p for p in pairs if p.chosen != p.rejected]  # TruthfulQA lists a few answers as both true and false
    lines = [json.dumps({"prompt": f"Q: {p.question}\nA:", "chosen": " " + p.chosen, "rejected": " " + p.rejected,
                         "group": types[p.qid]}) for p in kept]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} pairs of {len(qs)} questions to {args.out} "
          f"(left out {len(pairs) - len(kept)} pairs whose two answers are the same text)")


if __name__ == "__main__":
    main()
