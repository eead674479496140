"""Configuration shared by every stage: which model, which data, how to split it. Frozen dataclasses;
presets (quick, paper, smoke) are TOML data files in `locaudit/presets/`, read by `study.plan`."""

from __future__ import annotations

from dataclasses import dataclass

from locaudit.errors import LocauditError


@dataclass(frozen=True)
class ModelConfig:
    model: str = "smollm2-135m"
    device: str = "auto"
    dtype: str = "auto"


@dataclass(frozen=True)
class DataConfig:
    data_dir: str | None = None
    limit_questions: int | None = None
    seed: int = 0
    train_frac: float = 0.6
    val_frac: float = 0.2

    def __post_init__(self):
        if self.limit_questions is not None and self.limit_questions <= 0:
            raise LocauditError(f"limit_questions (--limit-questions) must be positive, got {self.limit_questions}")
        if self.seed < 0:
            raise LocauditError(f"seed (--seed) must be >= 0, got {self.seed}")

    def load_split(self):
        """Load TruthfulQA and split it by question as configured."""
        from locaudit.data.truthfulqa import load_truthfulqa, split_questions

        return split_questions(load_truthfulqa(self.data_dir), seed=self.seed, train_frac=self.train_frac,
                               val_frac=self.val_frac, limit=self.limit_questions)
