"""Evaluation of a (possibly edited) model: greedy generation of TruthfulQA answers, judged truthfulness and
informativeness, MC1/MC2, and CE/KL on general English text (ITI's metric set)."""
