"""Export a fitted edit for use outside locaudit: `export_peft(edit, lm, out)`.

- `LocalizedRank1` (delta r = s <a^l, o^l> W^l b^l, b^l zero outside the heads of S): in weight form
  W^l <- W^l + s (W^l b^l) a^l^T, a rank-1 LoRA with lora_B = W^l b^l (d_model x 1, the output side),
  lora_A = a^l^T (1 x H*d, the input side) and lora_alpha / r = s. Written as a PEFT adapter on exactly the
  layers of S.
- `NeuronRank1` (delta = s <a^l, m^l> W_down^l b^l, b^l zero outside the chosen neurons of layer l): the same
  rank-1 LoRA on the MLP output projection, W_down^l <- W_down^l + s (W_down^l b^l) a^l^T, lora_B = W_down^l b^l,
  lora_A = a^l^T (1 x n_neurons), lora_alpha / r = s, on exactly the layers with chosen neurons.
- `FullRank1` (W^l <- W^l + s B^l A^l): a PEFT adapter with its own factors and lora_alpha / r = s.
- `ITI` with placement "all" (o_h^l += alpha sigma_h u_h at every position): the bias W^l (alpha sigma u) it
  merges to, which PEFT's LoRA cannot hold, so the merged model itself (`save_pretrained` + tokenizer) is
  written instead. Placement "iti" shifts only some positions and is no weight edit at all.

`peft.PeftModel.from_pretrained(base, out)` (or `AutoModelForCausalLM.from_pretrained(out)` for ITI) then
gives the logits of the hooked edit. The inverse, `import_peft` (which `load_intervention` calls on an adapter
directory), reads such an adapter back as a FullRank1; it refuses the neuron edit's adapter (on W_down^l), which
no edit but that NeuronRank1 reproduces and whose neuron set PEFT's format does not record.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from locaudit.errors import LocauditError
from locaudit.interventions import ITI, FullRank1, Intervention, LocalizedRank1, NeuronRank1, NoEdit, import_peft
from locaudit.models import LoadedModel, arch_for
from locaudit.peft_adapter import TARGETS, RankOneLoRA, check_out_dir, write_adapter, write_dir

__all__ = ["export_peft", "import_peft", "check_out_dir"]


def _supported(edit: LocalizedRank1 | NeuronRank1, weight: Callable[[int], torch.Tensor]) -> RankOneLoRA:
    """lora_A = a^l^T, lora_B = P^l b^l (in float32 from the model's projection P^l = weight(l)), scale s."""
    A, B = {}, {}
    for l in edit.layers:
        P = weight(l).detach().float().cpu()
        A[l] = edit.a[str(l)].detach().float().cpu().view(1, -1)
        B[l] = (P @ edit.b(l).detach().float().cpu()).view(-1, 1)
    return RankOneLoRA(A=A, B=B, scale=edit.scale)


def _localized(edit: LocalizedRank1, lm: LoadedModel) -> RankOneLoRA:
    """P^l = W^l, the attention output projection."""
    return _supported(edit, lm.arch.W)


def _neurons(edit: NeuronRank1, lm: LoadedModel) -> RankOneLoRA:
    """P^l = W_down^l, the MLP output projection."""
    return _supported(edit, lm.arch.W_down)


def _full(edit: FullRank1, lm: LoadedModel) -> RankOneLoRA:
    return RankOneLoRA(A={l: edit.A[str(l)].detach().float().cpu() for l in edit.layers},
                       B={l: edit.B[str(l)].detach().float().cpu() for l in edit.layers}, scale=edit.scale)


def _as_adapter(factors: Callable[[Intervention, LoadedModel], RankOneLoRA],
                target: str = "attention") -> Callable[[Intervention, LoadedModel, Path], str]:
    """An exporter writing `factors(edit, lm)` as a PEFT adapter on the `target` projections (peft_adapter.TARGETS)."""
    def export(edit: Intervention, lm: LoadedModel, out: Path) -> str:
        lora = factors(edit, lm)
        write_adapter(out, lm, lora, target)
        return f"a PEFT rank-1 LoRA adapter on the {TARGETS[target][0]} of layers {lora.layers}"
    return export


# model_type -> the config flag that gives the attention projections biases, for the families whose W^l has
# none by default. Mistral and Qwen2 build o_proj without a bias whatever the config says: absent here.
BIAS_FLAGS = {t: "attention_bias" for t in ("llama", "smollm3", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text",
                                             "gpt_neox")}


def _iti_merged(edit: ITI, lm: LoadedModel, out: Path) -> str:
    """Save a copy of the model with W^l (alpha sigma u) added to the bias of each W^l (the original is untouched)."""
    if edit.placement != "all":
        raise LocauditError(f"an ITI edit with placement {edit.placement!r} shifts only the positions evaluation "
                            f"selects (prompt end, generated and answer tokens), so it is position-dependent and no "
                            f"weight or bias edit reproduces it; only ITI with placement 'all' can be exported")
    had_bias = all(p.bias is not None for p in lm.arch.out_projs)
    flag = BIAS_FLAGS.get(lm.arch.model_type)
    if not had_bias and flag is None:
        raise LocauditError(f"{lm.arch.model_type} checkpoints have no bias on the attention output projection "
                            f"(transformers builds it without one), so the ITI edit, a bias on W^l, cannot be saved "
                            f"as a merged model of this family; evaluate it with `locaudit eval --edit` instead")
    check_out_dir(out)
    model = copy.deepcopy(lm.model)
    merged = LoadedModel(model=model, tokenizer=lm.tokenizer, arch=arch_for(model), name=lm.name)
    edit.merge(merged)
    if not had_bias:
        _declare_biases(model, flag)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)

    write_dir(out, write)
    return (f"the merged model (ITI as a bias on the attention output projections of layers "
            f"{sorted(edit.layer_shifts(lm.arch))}; load it with AutoModelForCausalLM.from_pretrained)")


def _declare_biases(model: nn.Module, flag: str) -> None:
    """Set the config flag that makes the checkpoint carry attention biases, and give every projection the flag
    adds a bias (zeros, except W^l's, which `merge` filled) so that the saved weights match the config."""
    setattr(model.config.get_text_config(), flag, True)
    with torch.device("meta"):
        reference = type(model)(model.config)
    have = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for name, p in reference.named_parameters(remove_duplicate=False):
        if name in have:
            continue
        owner, leaf = name.rsplit(".", 1)
        module = model.get_submodule(owner)
        if leaf != "bias" or getattr(module, "weight", None) is None:
            raise LocauditError(f"setting {flag} adds {name} to this {model.config.model_type} model, not only biases; "
                                f"the ITI edit cannot be saved as a merged model here")
        module.bias = nn.Parameter(torch.zeros(p.shape, dtype=module.weight.dtype, device=module.weight.device),
                                   requires_grad=False)


EXPORTERS: dict[type, Callable[[Intervention, LoadedModel, Path], str]] = {
    LocalizedRank1: _as_adapter(_localized),
    NeuronRank1: _as_adapter(_neurons, "mlp"),
    FullRank1: _as_adapter(_full),
    ITI: _iti_merged,
}


def export_peft(edit: Intervention, lm: LoadedModel, out: Path) -> str:
    """Write `edit` (fitted on `lm`) into the new directory `out`, atomically: a PEFT LoRA adapter for the weight
    edits (localized, neuron, full), the merged model for ITI (see the module docstring). Returns what was written, in words."""
    export = EXPORTERS.get(type(edit))
    if export is None:
        what = "the unedited model has nothing" if isinstance(edit, NoEdit) else f"a {edit.kind!r} edit has no export"
        raise LocauditError(f"{what} to export; export a localized, neuron, full or ITI edit")
    check_out_dir(out)
    return export(edit, lm, Path(out))
