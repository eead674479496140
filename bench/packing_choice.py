"""What `--packing auto` decides on this machine: `locaudit.packing.measure` (the study's own timing of a tau grid
fitted one by one and in one pack) at three kinds of location on the paper's tau grid.

    python -m bench.packing_choice [--quick]

Locations: full alignment (rank-1 LoRA on every W^l, lowest edited layer 0), the 16 heads the quick run's probes
chose (lowest layer 13 on SmolLM2-135M), and one head at L22; five taus (the paper preset's 0.1 ... 0.5), the
quick preset's fit settings, TruthfulQA pairs. Writes bench/results/packing_choice.json with each decision.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from bench.common import load_lm, load_split, write_result
from locaudit.data.examples import preference_pairs
from locaudit.heads import parse_heads
from locaudit.methods import make_edit
from locaudit.packing import MIN_SPEEDUP, measure
from locaudit.study import load_preset

TAUS = (0.1, 0.2, 0.3, 0.4, 0.5)
# S* of the quick run (docs/results-quick.md; runs/<quick>/probes/top_heads.txt), lowest layer 13
PROBE16 = "L14H1,L26H6,L15H0,L15H8,L15H7,L28H5,L16H6,L17H2,L19H0,L23H6,L25H6,L27H8,L28H8,L28H4,L25H7,L13H3"
LOCATIONS = {"full alignment": None, "16 probe heads": PROBE16, "one head": "L22H0"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.packing_choice", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two taus instead of five")
    args = ap.parse_args(argv)
    lm, _ = load_lm()
    split = load_split(200)
    fit = load_preset("quick").fit
    taus = TAUS[:2] if args.quick else TAUS
    cfgs = [replace(fit, tau=t) for t in taus]
    train, val = preference_pairs(split.train), preference_pairs(split.val)
    rows = []
    for name, spec in LOCATIONS.items():
        heads = None if spec is None else parse_heads(spec, lm.arch.n_layers, lm.arch.n_heads)
        n_heads = None if heads is None else len(heads)
        t0 = time.time()
        c = measure(lm, [lambda: make_edit(lm, heads, seed=0)] * len(cfgs), train, val, cfgs, n_heads, name)
        rows.append({"location": name, "heads": spec, **c.as_dict(), "seconds_to_measure": time.time() - t0})
        print(c.line(), flush=True)
    write_result("packing_choice", args.quick, {"taus": list(taus), "min_speedup": MIN_SPEEDUP, "results": rows,
                                                "model": lm.name, "device": rows[0]["device"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
