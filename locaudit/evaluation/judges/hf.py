"""Judges that are local Hugging Face models (`hf:PATH_TRUTH,PATH_INFO`): sequence classifiers, or causal LMs
prompted as GPT-judge was."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from locaudit.errors import LocauditError
from locaudit.evaluation.judges.base import clean_inputs, judge_prompt
from locaudit.storage import file_sha256, stable_hash

USAGE = "hf:PATH_TRUTH,PATH_INFO"


class HFJudge:
    """A local Hugging Face judge: sequence classification (P(label 1) of the (question, answer) pair) or a
    causal LM judge such as the public truthfulqa-truth-judge models (P(" yes") normalised against " no")."""

    def __init__(self, path: str, name: str, batch_size: int = 8):
        p = Path(path).expanduser()
        if not (p / "config.json").is_file():
            raise LocauditError(f"hf judge {path!r} is not a local model directory with config.json; give hf:PATH_TRUTH,PATH_INFO")
        import torch
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        from locaudit.models import resolve_device

        self.name, self.path, self.batch_size = name, str(p), batch_size
        cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
        archs = " ".join(getattr(cfg, "architectures", None) or [])
        self.mode = "seqcls" if "ForSequenceClassification" in archs else "causal"
        self.device = resolve_device("auto")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            cls = AutoModelForSequenceClassification if self.mode == "seqcls" else AutoModelForCausalLM
            self.model = cls.from_pretrained(str(p), local_files_only=True, dtype=torch.float32).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise LocauditError(f"cannot load hf judge {path!r} ({str(e).splitlines()[0][:150]})") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.mode == "causal":
            self.yes = self.tokenizer.encode(" yes", add_special_tokens=False)
            self.no = self.tokenizer.encode(" no", add_special_tokens=False)
        self._version = "hf-" + stable_hash({"path": str(p.resolve()), "config": file_sha256(p / "config.json")}, 12)

    def score(self, questions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        qs, ans = clean_inputs(questions, answers)
        out = [self._batch(qs[i:i + self.batch_size], ans[i:i + self.batch_size]) for i in range(0, len(qs), self.batch_size)]
        return np.clip(np.concatenate(out), 0, 1) if out else np.zeros(0)

    def _batch(self, qs, ans) -> np.ndarray:
        import torch

        with torch.inference_mode():
            if self.mode == "seqcls":
                enc = self.tokenizer(qs, ans, padding=True, truncation=True, return_tensors="pt").to(self.device)
                logits = self.model(**enc).logits.float()
                p = torch.sigmoid(logits[:, 0]) if logits.shape[-1] == 1 else torch.softmax(logits, -1)[:, 1]
                return p.cpu().numpy().astype(np.float64)
            prompts = [judge_prompt(q, a, self.name) for q, a in zip(qs, ans)]
            ids = [self.tokenizer.encode(p) for p in prompts]
            lp_yes, lp_no = self._logprob(ids, self.yes), self._logprob(ids, self.no)
            return 1.0 / (1.0 + np.exp(lp_no - lp_yes))

    def _logprob(self, prompts: list[list[int]], cont: list[int]) -> np.ndarray:
        """log P(cont | prompt) per prompt, right-padded batch (exact for any tokenizer, one forward pass)."""
        import torch

        seqs = [p + cont for p in prompts]
        n = max(map(len, seqs))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([s + [pad] * (n - len(s)) for s in seqs], device=self.device)
        mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs], device=self.device)
        logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        out = np.zeros(len(seqs))
        for b, p in enumerate(prompts):
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(cont), device=self.device)
            out[b] = float(logp[b, pos, torch.tensor(cont, device=self.device)].sum())
        return out

    def info(self) -> dict:
        return {"version": self._version, "name": self.name, "backbone": self.path, "type": f"hf-{self.mode}",
                "heldout_answer_acc": None, "heldout_question_acc": None, "heldout_answer_bacc": None,
                "heldout_question_bacc": None, "n_train": None}



def hf_judges(arg: str) -> tuple[HFJudge, HFJudge]:
    """(truth, info) judges from "PATH_TRUTH,PATH_INFO" (the spec after "hf:")."""
    paths = [p.strip() for p in arg.split(",")]
    if len(paths) != 2 or not all(paths):
        raise LocauditError(f"judge spec {'hf:' + arg!r}: use {USAGE} (two local model directories)")
    return HFJudge(paths[0], "truth"), HFJudge(paths[1], "info")
