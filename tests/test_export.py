"""PEFT export and import (locaudit.export, locaudit.peft_adapter, interventions.import_peft) on tiny models of
every family: the adapter PEFT loads gives the hooked edit's logits, the merged ITI model gives ITI's, the
adapter reads back as the same weight deltas, and adapters locaudit cannot represent are refused in one line."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from locaudit.cli import main
from locaudit.errors import LocauditError
from locaudit.export import BIAS_FLAGS, export_peft, import_peft
from locaudit.heads import parse_heads
from locaudit.interventions import ITI, FullRank1, LocalizedRank1, NeuronRank1, NoEdit, load_intervention
from locaudit.models import LoadedModel, arch_for, load_model
from locaudit.peft_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SUPPORTED, out_proj_names, proj_names
from tests.conftest import make_tiny
from locaudit.unitsets import parse_neurons
from tests.test_reliability import real_rows, write_csv

# float32 on CPU: PEFT adds scale * B (A o) after W o, the hook adds s <a, o> b before W (or B (A o) after it);
# the same sums in another order differ by ~5e-6 on these logits of size ~5.
ATOL = 1e-4
HEADS = "L0H1,L0H3,L2H0"  # two layers
NEURONS = "L0N3,L0N17,L2N5,L2N40"  # two layers


def ids():
    return torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(3))


def logits(model, edit=None, lm=None) -> torch.Tensor:
    with torch.no_grad():
        if edit is None:
            return model(ids()).logits
        with edit.attach(lm):
            return model(ids()).logits


def _randomise_ab(edit, seed: int, b_sd: float, a_sd: float = 0.4):
    """Give an a/b_s edit (localized or neuron) random a ~ N(0, a_sd^2) and b_s ~ N(0, b_sd^2), in that order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in edit.a.values():
            p.copy_(torch.randn(p.shape, generator=g) * a_sd)
        for p in edit.b_s.values():
            p.copy_(torch.randn(p.shape, generator=g) * b_sd)
    return edit


def trained_localized(lm, scale: float = 2.5) -> LocalizedRank1:
    """A localized edit that looks trained: random a and b (b on S's slices only), a non-unit scale."""
    edit = LocalizedRank1(parse_heads(HEADS, lm.arch.n_layers, lm.arch.n_heads), lm.arch, seed=1, scale=scale)
    return _randomise_ab(edit, seed=7, b_sd=0.5)


def trained_full(lm, layers=None, scale: float = 0.7) -> FullRank1:
    edit = FullRank1(lm.arch, seed=2, layers=layers, scale=scale)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in list(edit.A.values()) + list(edit.B.values()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return edit


def peft_model(lm, out):
    """PEFT's own loader on a copy of the base model; also returns the names of the modules it wrapped."""
    pm = PeftModel.from_pretrained(copy.deepcopy(lm.model), str(out))
    pm.eval()
    prefix = "base_model.model."
    wrapped = {n[len(prefix):-len(".lora_A")] for n, _ in pm.named_modules() if n.endswith(".lora_A")}
    return pm, wrapped


def deltas(edit, lm) -> dict[int, torch.Tensor]:
    """{l: the (d_model, H*d) change of W^l} that merging the edit makes."""
    model = copy.deepcopy(lm.model)
    merged = LoadedModel(model=model, tokenizer=lm.tokenizer, arch=arch_for(model), name=lm.name)
    edit.merge(merged)
    return {l: merged.arch.W(l) - lm.arch.W(l) for l in range(lm.arch.n_layers)}


def test_localized_adapter_matches_hooked_edit_and_reads_back(tiny, tmp_path):
    lm = tiny
    edit = trained_localized(lm)
    hooked, base = logits(lm.model, edit, lm), logits(lm.model)
    assert (hooked - base).abs().max() > 0.1  # the edit does something the comparison can see
    out = tmp_path / "peft"
    assert "layers [0, 2]" in export_peft(edit, lm, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]  # no temporary directory left
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["r"] == 1 and cfg["lora_alpha"] == 2.5 and cfg["fan_in_fan_out"] == (lm.arch.model_type == "gpt2")
    names = out_proj_names(lm)
    assert cfg["target_modules"] == [names[0], names[2]]
    # lora_B = W^l b^l, lora_A = a^l^T: the factorisation, stored as is
    tensors = load_file(str(out / ADAPTER_WEIGHTS))
    W0 = lm.arch.W(0).float()
    assert torch.allclose(tensors[f"base_model.model.{names[0]}.lora_B.weight"][:, 0], W0 @ edit.b(0), atol=1e-6)
    assert torch.equal(tensors[f"base_model.model.{names[0]}.lora_A.weight"][0], edit.a["0"].detach())

    pm, wrapped = peft_model(lm, out)
    assert wrapped == {names[0], names[2]}  # exactly the edited layers' W^l
    assert torch.allclose(logits(pm), hooked, atol=ATOL, rtol=0)
    assert torch.equal(logits(lm.model), base)  # exporting left the model alone

    back = load_intervention(out, lm.arch)  # what `locaudit eval --edit OUT` does
    assert isinstance(back, FullRank1) and back.layers == [0, 2] and back.scale == 2.5
    want, got = deltas(edit, lm), deltas(back, lm)
    for l in range(lm.arch.n_layers):
        assert torch.allclose(got[l], want[l], atol=1e-6, rtol=0), l
    assert not want[1].any() and want[0].abs().max() > 1e-2
    assert torch.allclose(logits(lm.model, back, lm), hooked, atol=ATOL, rtol=0)


def test_full_rank1_adapter_round_trips_exactly(tiny, tmp_path):
    lm = tiny
    for layers in (None, [1]):
        edit = trained_full(lm, layers)
        out = tmp_path / f"peft-{layers}"
        export_peft(edit, lm, out)
        hooked = logits(lm.model, edit, lm)
        assert (hooked - logits(lm.model)).abs().max() > 0.1
        pm, wrapped = peft_model(lm, out)
        names = out_proj_names(lm)
        assert wrapped == {names[l] for l in edit.layers}
        assert torch.allclose(logits(pm), hooked, atol=ATOL, rtol=0)
        back = import_peft(out, lm.arch)
        assert back.layers == edit.layers and back.all_layers == (layers is None) and back.scale == edit.scale
        for l in edit.layers:
            assert torch.equal(back.A[str(l)], edit.A[str(l)]) and torch.equal(back.B[str(l)], edit.B[str(l)])


def trained_neurons(lm, scale: float = 1.8) -> NeuronRank1:
    """A neuron edit that looks trained: random a and b (b on the chosen neurons only), a non-unit scale."""
    edit = NeuronRank1(parse_neurons(NEURONS, lm.arch.n_layers, lm.arch.n_neurons), lm.arch, seed=1, scale=scale)
    return _randomise_ab(edit, seed=11, b_sd=0.8)


def test_neuron_adapter_matches_hooked_edit_and_is_refused_on_import(tiny, tmp_path):
    lm = tiny
    edit = trained_neurons(lm)
    hooked, base = logits(lm.model, edit, lm), logits(lm.model)
    assert (hooked - base).abs().max() > 0.1
    out = tmp_path / "peft"
    assert export_peft(edit, lm, out) == "a PEFT rank-1 LoRA adapter on the MLP output projections of layers [0, 2]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["r"] == 1 and cfg["lora_alpha"] == 1.8 and cfg["fan_in_fan_out"] == (lm.arch.model_type == "gpt2")
    names = proj_names(lm, "mlp")
    assert cfg["target_modules"] == [names[0], names[2]]
    assert names[0].endswith(lm.arch.family.down_proj) and names[0] != out_proj_names(lm)[0]
    # lora_B = W_down^l b^l (b^l zero outside the chosen neurons), lora_A = a^l^T
    tensors = load_file(str(out / ADAPTER_WEIGHTS))
    b2 = edit.b(2).detach()
    assert torch.count_nonzero(b2) == 2 and b2[5] != 0 and b2[40] != 0
    assert torch.allclose(tensors[f"base_model.model.{names[2]}.lora_B.weight"][:, 0],
                          lm.arch.W_down(2).float() @ b2, atol=1e-6)
    assert tensors[f"base_model.model.{names[2]}.lora_A.weight"].shape == (1, lm.arch.n_neurons)
    assert torch.equal(tensors[f"base_model.model.{names[2]}.lora_A.weight"][0], edit.a["2"].detach())

    pm, wrapped = peft_model(lm, out)
    assert wrapped == {names[0], names[2]}  # exactly the edited layers' W_down^l
    assert torch.allclose(logits(pm), hooked, atol=ATOL, rtol=0)
    merged = copy.deepcopy(lm.model)  # PEFT's merge_and_unload gives the same weights as the edit's merge
    edit.merge(LoadedModel(model=merged, tokenizer=lm.tokenizer, arch=arch_for(merged), name=lm.name))
    assert torch.allclose(logits(pm.merge_and_unload()), logits(merged), atol=ATOL, rtol=0)
    assert torch.equal(logits(lm.model), base)  # exporting left the model alone

    # import_peft refuses it: no locaudit edit but this NeuronRank1 is the update, and the neuron set is not recorded
    with pytest.raises(LocauditError) as e:
        load_intervention(out, lm.arch)
    msg = str(e.value)
    assert msg.startswith(f"PEFT adapter {out} targets {names[0]}, which is not an attention output projection "
                          f"but an MLP output projection") and msg.endswith(SUPPORTED) and "\n" not in msg


def random_iti(lm, placement: str) -> ITI:
    g = torch.Generator().manual_seed(5)
    heads = parse_heads(HEADS, lm.arch.n_layers, lm.arch.n_heads)
    u = torch.nn.functional.normalize(torch.randn(len(heads), lm.arch.head_dim, generator=g), dim=-1)
    return ITI(heads, u, torch.rand(len(heads), generator=g) + 0.5, 4.0, placement=placement)


def test_iti_all_exports_the_merged_model(tiny, tmp_path):
    lm = tiny
    edit = random_iti(lm, "all")
    hooked, base = logits(lm.model, edit, lm), logits(lm.model)
    assert (hooked - base).abs().max() > 0.1
    had_bias = [p.bias is not None for p in lm.arch.out_projs]
    config_before = lm.model.config.to_dict()
    out = tmp_path / "merged"
    if lm.arch.model_type == "qwen2":  # o_proj is built without a bias whatever the config says
        with pytest.raises(LocauditError, match=r"^qwen2 checkpoints have no bias on the attention output projection"):
            export_peft(edit, lm, out)
        assert not out.exists()
        return
    assert "merged model" in export_peft(edit, lm, out)
    merged = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
    merged.eval()
    assert torch.allclose(logits(merged), hooked, atol=ATOL, rtol=0)
    if not all(had_bias):
        assert getattr(merged.config, BIAS_FLAGS[lm.arch.model_type]) is True
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("a question?")["input_ids"] == lm.tokenizer("a question?")["input_ids"]
    # the caller's model is untouched: no bias added, config unchanged, same logits
    assert [p.bias is not None for p in lm.arch.out_projs] == had_bias
    assert lm.model.config.to_dict() == config_before
    assert torch.equal(logits(lm.model), base)


def test_what_cannot_be_exported(tiny_llama, tmp_path):
    lm = tiny_llama
    with pytest.raises(LocauditError, match="position-dependent and no weight or bias edit reproduces it"):
        export_peft(random_iti(lm, "iti"), lm, tmp_path / "a")
    with pytest.raises(LocauditError, match="the unedited model has nothing to export"):
        export_peft(NoEdit(), lm, tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.txt").write_text("keep me")
    with pytest.raises(LocauditError, match="already exists and is not an empty directory"):
        export_peft(trained_localized(lm), lm, tmp_path / "c")
    assert (tmp_path / "c" / "x.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    (tmp_path / "empty").mkdir()  # an empty directory is a fine target
    export_peft(trained_localized(lm), lm, tmp_path / "empty")
    assert (tmp_path / "empty" / ADAPTER_CONFIG).is_file()


def save_peft(lm, out, **kw):
    """A real PEFT adapter (PEFT's own get_peft_model + save_pretrained) on a copy of lm."""
    model = get_peft_model(copy.deepcopy(lm.model), LoraConfig(**{"r": 1, "target_modules": ["o_proj"], **kw}))
    model.save_pretrained(str(out))
    return out


def test_real_peft_rank1_adapter_imports(tiny_llama, tmp_path):
    """An adapter PEFT itself made (r = 1 on every o_proj, rsLoRA, lora_alpha 3, B trained away from 0)."""
    lm = tiny_llama
    model = get_peft_model(copy.deepcopy(lm.model), LoraConfig(r=1, lora_alpha=3, use_rslora=True, target_modules=["o_proj"]))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=g)
    model.eval()
    want = logits(model)
    model.save_pretrained(str(tmp_path / "a"))
    edit = load_intervention(tmp_path / "a", lm.arch)
    assert isinstance(edit, FullRank1) and edit.all_layers and edit.scale == 3.0
    assert (want - logits(lm.model)).abs().max() > 0.1
    assert torch.allclose(logits(lm.model, edit, lm), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kw, problem", [
    ({"r": 2}, "has rank r = 2"),
    ({"target_modules": ["q_proj"]}, "targets model.layers.0.self_attn.q_proj, which is not an attention output projection"),
    ({"target_modules": ["o_proj", "down_proj"]}, "which is not an attention output projection"),
    ({"use_dora": True}, "sets use_dora = True"),
    ({"lora_bias": True}, "sets lora_bias = True"),
    ({"modules_to_save": ["lm_head"]}, "sets modules_to_save = ['lm_head']"),
    ({"rank_pattern": {"model.layers.1.self_attn.o_proj": 2}}, "sets rank_pattern"),
])
def test_unsupported_adapters_are_refused(tiny_llama, tmp_path, kw, problem):
    out = save_peft(tiny_llama, tmp_path / "bad", **kw)
    with pytest.raises(LocauditError) as e:
        load_intervention(out, tiny_llama.arch)
    msg = str(e.value)
    assert problem in msg and msg.endswith(SUPPORTED) and "\n" not in msg
    assert msg.startswith(f"PEFT adapter {out} ")


def test_other_adapters_and_broken_files_are_refused(tiny_llama, tmp_path):
    lm = tiny_llama
    ia3 = get_peft_model(copy.deepcopy(lm.model), IA3Config(target_modules=["o_proj"], feedforward_modules=[]))
    ia3.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(LocauditError, match=r"is a 'IA3' adapter, not LoRA; locaudit reads only PEFT LoRA"):
        load_intervention(tmp_path / "ia3", lm.arch)
    gpt2 = make_tiny("gpt2")
    export_peft(trained_localized(gpt2), gpt2, tmp_path / "gpt2")
    with pytest.raises(LocauditError, match=r"targets transformer\.h\.0\.attn\.c_proj, which is not an attention "
                                            r"output projection \(\*\.self_attn\.o_proj\) of this llama model"):
        load_intervention(tmp_path / "gpt2", lm.arch)
    good = tmp_path / "good"
    export_peft(trained_localized(lm), lm, good)
    (good / ADAPTER_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(LocauditError, match="adapter_model.safetensors is unreadable"):
        load_intervention(good, lm.arch)
    (good / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(LocauditError, match="has no adapter_model.safetensors"):
        load_intervention(good, lm.arch)
    (good / ADAPTER_CONFIG).write_text("[1, 2]")
    with pytest.raises(LocauditError, match="not a JSON object"):
        load_intervention(good, lm.arch)


@pytest.fixture
def model_dir(tmp_path):
    """A tiny Llama saved as a model directory, loadable with --model."""
    lm = make_tiny("llama")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def one_error_line(capsys, argv, *fragments) -> str:
    rc = main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.rstrip("\n").split("\n") if "\r" not in line]
    assert rc == 2 and len(err) == 1 and err[0].startswith("locaudit: error: "), (rc, err)
    for f in fragments:
        assert f in err[0], (f, err[0])
    return err[0]


def test_cli_export_and_eval_of_the_adapter(model_dir, tmp_path, capsys):
    lm = load_model(str(model_dir), device="cpu", dtype="float32")
    edit = trained_localized(lm)
    edit.save(tmp_path / "edit", extra={"model": str(model_dir)})
    out = tmp_path / "adapter"
    assert main(["export", str(tmp_path / "edit"), "--peft", str(out), "--model", str(model_dir)]) == 0
    assert "wrote a PEFT rank-1 LoRA adapter on the attention output projections of layers [0, 2]" in capsys.readouterr().out
    pm, _ = peft_model(lm, out)
    assert torch.allclose(logits(pm), logits(lm.model, edit, lm), atol=ATOL, rtol=0)
    # errors: one line, before the model is loaded, nothing written
    one_error_line(capsys, ["export", tmp_path / "edit", "--peft", out, "--model", model_dir],
                   "already exists and is not an empty directory")
    one_error_line(capsys, ["export", tmp_path, "--peft", tmp_path / "new", "--model", model_dir],
                   "is not an edit directory (needs edit.json and edit.safetensors)")
    one_error_line(capsys, ["export", tmp_path / "edit"], "the following arguments are required: --peft")
    assert not (tmp_path / "new").exists()
    # `eval --edit` reads the adapter through load_intervention: same numbers as the edit it came from
    data = tmp_path / "data"
    write_csv(data, real_rows(12))
    common = ["--model", model_dir, "--data-dir", data, "--split", "test", "--judge", f"hf:{model_dir},{model_dir}",
              "--text-docs", "2", "--max-new-tokens", "4", "--device", "cpu", "--dtype", "float32"]
    metrics = {}
    for name, edit_dir in (("native", tmp_path / "edit"), ("peft", out)):
        argv = ["eval", "--edit", edit_dir, "--out", tmp_path / f"eval-{name}", *common]
        assert main([str(a) for a in argv]) == 0
        metrics[name] = json.loads((tmp_path / f"eval-{name}" / "metrics.json").read_text())
    capsys.readouterr()
    assert metrics["peft"]["edit_config"]["kind"] == "full"
    for k in ("truth", "info", "mc1", "mc2", "ce", "kl"):
        assert math.isclose(metrics["native"][k], metrics["peft"][k], rel_tol=1e-4, abs_tol=1e-5), k
    assert metrics["native"]["kl"] > 1e-3  # the edit changed the model
    bad = save_peft(lm, tmp_path / "rank2", r=2)
    one_error_line(capsys, ["eval", "--edit", bad, "--out", tmp_path / "eval-bad", *common], "has rank r = 2",
                   "locaudit reads only PEFT LoRA adapters of rank 1")
