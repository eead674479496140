"""Interventions on a model's units (attention heads, MLP neurons, whole layers), all behind one protocol.

Most interventions edit layer l's attention output r^{l+1} = r^l + W^l o^l; `NeuronRank1` edits its MLP output
W_down^l m^l and `ResidualRank1` the residual stream after block l. Every intervention can
- `attach(lm)`: a context manager that installs hooks and removes them on exit (generation, MC scoring,
  KL and training all use a model with an intervention attached and never ask which kind it is);
- `merge(lm)`: fold the edit into the weights exactly (then `save_pretrained` works; activation edits that no
  weight can hold raise instead);
- `save(dir)` / `load_intervention(dir)`: `edit.safetensors` + `edit.json`; `load_intervention` also reads a PEFT
  rank-1 LoRA adapter directory on the W^l (`import_peft`; `locaudit.export.export_peft` writes them). Its
  table `_LOADERS` maps each kind to its loader; kinds defined elsewhere join it by `register_loader`.

Kinds:
- `ITI` (Li et al. 2023, eq. 5 of Wang & Veitch): o_h^l += alpha * sigma_h^l * u_h^l for heads in S, at the
  positions its `placement` selects. `placement="iti"` (the default) follows ITI's own code
  (honest_llama's `lt_modulated_vector_add`): in generation the last prompt token and every generated token,
  in MC scoring the answer tokens only, on plain text (CE/KL) every token; the instruction / few-shot primer
  and the question are never shifted. `placement="all"` shifts every position of every forward pass; only
  that version is a bias, so only it can be merged (`merge` folds W^l (alpha sigma u) into the bias of W^l).
- `LocalizedRank1` (the paper's reparameterised rank-1 LoRA): r^{l+1} = r^{l+1}_orig + <a^l, o^l> W^l b^l,
  with b^l zero outside the heads of S in layer l. b^l is stored only on S's slices, so entries outside S are
  structurally zero. Equivalent to o^l <- o^l + <a^l, o^l> b^l; merged: W^l <- W^l + W^l b^l a^l^T.
- `FullRank1`: ordinary rank-1 LoRA on every W^l: W^l <- W^l + B^l A^l (B: d_model x 1, A: 1 x H*d).
- `NeuronRank1`: LocalizedRank1 with MLP neurons for heads: MLP output += s <a^l, m^l> W_down^l b^l, b^l zero
  outside the chosen neurons; merged: W_down^l <- W_down^l + s W_down^l b^l a^l^T.
- `ResidualRank1`: r^l <- r^l + s <a^l, r^l> b^l on the residual stream after block l (not mergeable).
Initialisation follows LoRA: the output-side factor (b, B) is zero, so the edit starts as the identity.
Weight edits (LocalizedRank1, FullRank1, NeuronRank1, NoEdit) and ResidualRank1 act at every position, as in
the paper. `locaudit.units` builds the optimal edit of any set of units (`UnitSet.make_edit`).

Edit positions. Evaluation code does not know which edit is attached; it declares, for the forward passes it
is about to run, which token positions a position-selective edit acts on: `with edit_positions(lm, mask):`
with `mask` a (batch, tokens) bool tensor over exactly the tokens of those forwards, or None for every
position (the default when nothing is declared). Generation declares its prefill's last column (the last
prompt token; rows are left-padded) and every decoded token; answer scoring declares the answer tokens (and
no prompt or prefix token); the shared prefix (`scoring.prefix_kv`) declares none; CE/KL declares every
token. Only `ITI` with `placement="iti"` reads the declaration; every other edit ignores it.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from locaudit.errors import LocauditError
from locaudit.heads import HeadSet, parse_heads
from locaudit.models import Arch, LoadedModel
from locaudit.peft_adapter import is_adapter_dir, read_adapter
from locaudit.storage import atomic_write, atomic_write_json, read_json
from locaudit.unitsets import LayerSet, NeuronSet, parse_layers, parse_neurons


_POSITIONS = "_locaudit_edit_positions"  # attribute of lm.model holding the declared positions
_ALL = object()  # nothing declared: every position


@contextlib.contextmanager
def edit_positions(lm: LoadedModel, mask: torch.Tensor | None) -> Iterator[None]:
    """Declare where a position-selective edit (ITI with `placement="iti"`) acts in the forwards run inside
    the block: `mask` is a (batch, tokens) bool tensor over the input tokens of each of those forwards
    (True: shift this position), or None for every position. Declarations nest; the innermost wins, and
    leaving the block restores the outer one. Weight edits ignore it."""
    model = lm.model
    old = model.__dict__.get(_POSITIONS, _ALL)
    if mask is not None:
        mask = torch.as_tensor(mask, device=lm.device).bool()
        if mask.dim() != 2:
            raise LocauditError(f"edit positions must be a (batch, tokens) mask, got shape {tuple(mask.shape)}")
    object.__setattr__(model, _POSITIONS, mask)
    try:
        yield
    finally:
        if old is _ALL:
            model.__dict__.pop(_POSITIONS, None)
        else:
            object.__setattr__(model, _POSITIONS, old)


def declared_positions(lm: LoadedModel) -> torch.Tensor | None:
    """The (batch, tokens) mask declared by the innermost `edit_positions` block, or None (every position)."""
    return lm.model.__dict__.get(_POSITIONS)


class Intervention(nn.Module):
    kind = "base"

    def _hooks(self, lm: LoadedModel) -> list:  # pragma: no cover - abstract
        raise NotImplementedError

    @contextlib.contextmanager
    def attach(self, lm: LoadedModel) -> Iterator["Intervention"]:
        """Install this edit's hooks on `lm` for the duration of the `with` block."""
        self.to(lm.device)
        handles = self._hooks(lm)
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def merge(self, lm: LoadedModel) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def is_identity(self) -> bool:
        """Whether the edit provably leaves the model unchanged (e.g. at initialisation)."""
        return False

    def config(self) -> dict:
        return {"kind": self.kind}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def save(self, out: Path, extra: dict | None = None) -> None:
        out = Path(out)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.tensors().items()}
        atomic_write(out / "edit.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        atomic_write_json(out / "edit.json", {**(extra or {}), **self.config()})


class NoEdit(Intervention):
    """The unedited model, so callers can treat 'no intervention' like any other."""

    kind = "none"

    def _hooks(self, lm: LoadedModel) -> list:
        return []

    def merge(self, lm: LoadedModel) -> None:
        pass

    def is_identity(self) -> bool:
        return True


PLACEMENTS = ("iti", "all")


class ITI(Intervention):
    """Inference-time intervention: add alpha * sigma * u to each selected head's slice of o^l.

    `placement`: "iti" (default) shifts only the positions evaluation code declares (`edit_positions`): ITI's
    own protocol (last prompt token and generated tokens in generation, answer tokens in MC scoring, every
    token of plain text); "all" shifts every position of every forward, prompt and few-shot primer included,
    which is what a bias does (`merge`)."""

    kind = "iti"

    def __init__(self, heads: HeadSet, directions: torch.Tensor, sigmas: torch.Tensor, alpha: float,
                 placement: str = "iti"):
        """directions: (len(heads), d) unit vectors u; sigmas: (len(heads),); in `heads` order."""
        super().__init__()
        if placement not in PLACEMENTS:
            raise LocauditError(f"unknown ITI placement {placement!r}; use one of {', '.join(PLACEMENTS)}")
        self.heads = heads
        self.alpha = float(alpha)
        self.placement = placement
        self.register_buffer("u", torch.as_tensor(directions, dtype=torch.float32))
        self.register_buffer("sigma", torch.as_tensor(sigmas, dtype=torch.float32))

    @classmethod
    def from_probes(cls, heads: HeadSet, probes, alpha: float, placement: str = "iti") -> "ITI":
        idx_l = [h.layer for h in heads]
        idx_h = [h.head for h in heads]
        return cls(heads, torch.as_tensor(probes.directions[idx_l, idx_h]), torch.as_tensor(probes.sigmas[idx_l, idx_h]),
                   alpha, placement)

    def layer_shifts(self, arch: Arch) -> dict[int, torch.Tensor]:
        """{l: the (H*d,) vector added to o^l}: alpha * sigma_h * u_h in each selected head's slice."""
        shifts: dict[int, torch.Tensor] = {}
        for i, h in enumerate(self.heads):
            v = shifts.setdefault(h.layer, torch.zeros(arch.n_heads * arch.head_dim, device=self.u.device))
            v[arch.head_slice(h.head)] += self.alpha * self.sigma[i] * self.u[i]
        return shifts

    def _hooks(self, lm: LoadedModel) -> list:
        arch = lm.arch
        self.heads.validate(arch.n_layers, arch.n_heads)
        selective = self.placement == "iti"
        handles = []
        for l, v in self.layer_shifts(arch).items():
            def hook(module, args, v=v):
                o = args[0]
                shift = v.to(o.dtype)
                mask = declared_positions(lm) if selective else None
                if mask is not None:
                    if tuple(mask.shape) != tuple(o.shape[:2]):
                        raise LocauditError(f"declared edit positions {tuple(mask.shape)} do not match the forward's "
                                            f"(batch, tokens) {tuple(o.shape[:2])}")
                    shift = mask.unsqueeze(-1).to(device=o.device, dtype=o.dtype) * shift
                return (o + shift,) + tuple(args[1:])
            handles.append(arch.out_proj(l).register_forward_pre_hook(hook))
        return handles

    def merge(self, lm: LoadedModel) -> None:
        """Bake: bias of W^l += W^l (alpha sigma u), which adds the same vector at every position; so only
        `placement="all"` can be merged."""
        if self.placement != "all":
            raise LocauditError(f"an ITI edit with placement {self.placement!r} shifts only some positions, which no "
                                f"bias reproduces; only placement 'all' can be merged into the weights")
        arch = lm.arch
        for l, v in self.layer_shifts(arch).items():
            W = arch.W(l)
            arch.add_to_bias(l, W.float() @ v.to(W.device))

    def is_identity(self) -> bool:
        return self.alpha == 0.0

    def config(self) -> dict:
        return {"kind": self.kind, "heads": self.heads.names, "alpha": self.alpha, "label": self.heads.label,
                "placement": self.placement}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"u": self.u, "sigma": self.sigma}


def _lora_a_init(n: int, generator: torch.Generator) -> torch.Tensor:
    """LoRA's input-side initialisation: Kaiming-uniform, bound 1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(n)
    return (torch.rand(n, generator=generator) * 2 - 1) * bound


class _SupportedRank1(Intervention):
    """delta = s <a^l, x^l> P^l b^l at a projection P^l whose input x^l is `n_blocks` blocks of `block` entries, with
    b^l non-zero only on the chosen blocks `support[l]` of layer l. b^l is stored only on those blocks, so entries
    outside are structurally zero (and get no gradient). Equivalent to x^l <- x^l + s <a^l, x^l> b^l; merged:
    P^l <- P^l + s P^l b^l a^l^T. LocalizedRank1 (P = W, blocks = heads of size d) and NeuronRank1 (P = W_down,
    blocks = single neurons) are this edit at two projections."""

    noun = "unit"

    def __init__(self, support: dict[int, list[int]], n_blocks: int, block: int, seed: int, scale: float):
        super().__init__()
        self.scale = float(scale)
        self.n_blocks, self.block = n_blocks, block
        self.layers = list(support)
        self.support = support
        g = torch.Generator().manual_seed(seed)
        width = n_blocks * block
        self.a = nn.ParameterDict({str(l): nn.Parameter(_lora_a_init(width, g)) for l in self.layers})
        self.b_s = nn.ParameterDict({str(l): nn.Parameter(torch.zeros(len(ix), block)) for l, ix in support.items()})

    def _proj(self, arch: Arch, layer: int) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def _weight(self, arch: Arch, layer: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _add_to_weight(self, arch: Arch, layer: int, delta: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def b(self, layer: int) -> torch.Tensor:
        """The full vector b^l: the chosen blocks from the parameter, exact zeros elsewhere."""
        bs = self.b_s[str(layer)]
        full = bs.new_zeros(self.n_blocks, self.block)
        full = full.index_copy(0, torch.tensor(self.support[layer], device=bs.device), bs)
        return full.reshape(-1)

    def _hooks(self, lm: LoadedModel) -> list:
        arch = lm.arch
        handles = []
        for l in self.layers:
            def hook(module, args, l=l):
                o = args[0]
                a = self.a[str(l)].to(o.dtype)
                b = self.b(l).to(o.dtype)
                return (o + self.scale * (o @ a).unsqueeze(-1) * b,) + tuple(args[1:])
            handles.append(self._proj(arch, l).register_forward_pre_hook(hook))
        return handles

    def merge(self, lm: LoadedModel) -> None:
        """P^l <- P^l + scale P^l b^l a^l^T, exactly the hooked edit."""
        arch = lm.arch
        for l in self.layers:
            W = self._weight(arch, l).float()
            a, b = self.a[str(l)].detach().float().to(W.device), self.b(l).detach().float().to(W.device)
            self._add_to_weight(arch, l, self.scale * torch.outer(W @ b, a))

    def is_identity(self) -> bool:
        """b = 0 (as at initialisation) makes <a, x> P b vanish."""
        return all(not bool(p.detach().any()) for p in self.b_s.values())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for l in self.layers:
            out[f"a.{l}"] = self.a[str(l)]
            out[f"b.{l}"] = self.b(l)
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        width = self.n_blocks * self.block
        with torch.no_grad():
            for l in self.layers:
                a = tensors[f"a.{l}"]
                if tuple(a.shape) != (width,):
                    raise ValueError(f"a.{l} has shape {tuple(a.shape)}, expected ({width},)")
                self.a[str(l)].copy_(a)
                b = tensors[f"b.{l}"].view(self.n_blocks, self.block)
                outside = [i for i in range(self.n_blocks) if i not in self.support[l]]
                if outside and b[outside].abs().max() > 0:
                    raise LocauditError(f"edit file has non-zero b.{l} outside the {self.noun}s of S; it is corrupt")
                self.b_s[str(l)].copy_(b[self.support[l]])


class LocalizedRank1(_SupportedRank1):
    """delta r^{l+1} = <a^l, o^l> W^l b^l with b^l supported on the heads of S (the paper's optimal edit)."""

    kind = "localized"
    noun = "head"

    def __init__(self, heads: HeadSet, arch: Arch, seed: int = 0, scale: float = 1.0):
        """`scale` multiplies the edit, as PEFT's lora_alpha / r does (see `FitConfig.lora_scale`)."""
        heads.validate(arch.n_layers, arch.n_heads)
        # b^l lives only on S's slices: shape (heads of S in layer l, d); everything else is not a parameter.
        super().__init__(heads.by_layer(), arch.n_heads, arch.head_dim, seed, scale)
        self.heads = heads

    @property
    def n_heads(self) -> int:
        return self.n_blocks

    @property
    def head_dim(self) -> int:
        return self.block

    @property
    def head_idx(self) -> dict[int, list[int]]:
        return self.support

    def _proj(self, arch: Arch, layer: int) -> nn.Module:
        return arch.out_proj(layer)

    def _weight(self, arch: Arch, layer: int) -> torch.Tensor:
        return arch.W(layer)

    def _add_to_weight(self, arch: Arch, layer: int, delta: torch.Tensor) -> None:
        arch.add_to_W(layer, delta)

    def config(self) -> dict:
        return {"kind": self.kind, "heads": self.heads.names, "label": self.heads.label, "scale": self.scale}


class NeuronRank1(_SupportedRank1):
    """delta (MLP output of layer l) = s <a^l, m^l> W_down^l b^l, with m^l the MLP hidden activation (the input of
    W_down^l), a^l over all of m^l and b^l non-zero only on the chosen neurons of layer l: the optimal edit at a
    set of MLP neurons, the analogue of LocalizedRank1 with neurons for heads. Merged: W_down^l += s (W_down^l b^l) a^l^T."""

    kind = "neurons"
    noun = "neuron"

    def __init__(self, neurons: NeuronSet, arch: Arch, seed: int = 0, scale: float = 1.0):
        neurons.validate(arch.n_layers, arch.n_neurons)
        super().__init__(neurons.by_layer(), arch.n_neurons, 1, seed, scale)
        self.neurons = neurons

    def _proj(self, arch: Arch, layer: int) -> nn.Module:
        return arch.down_proj(layer)

    def _weight(self, arch: Arch, layer: int) -> torch.Tensor:
        return arch.W_down(layer)

    def _add_to_weight(self, arch: Arch, layer: int, delta: torch.Tensor) -> None:
        arch.add_to_W_down(layer, delta)

    def config(self) -> dict:
        return {"kind": self.kind, "neurons": self.neurons.names, "label": self.neurons.label, "scale": self.scale}


class ResidualRank1(Intervention):
    """r^l <- r^l + s <a^l, r^l> b^l on the residual stream r^l after block l, for each chosen layer (a^l, b^l of
    size d_model; b = 0 at initialisation, so the edit starts as the identity): the optimal edit at a whole layer.

    It has no steering vector c (r <- r + c + s<a, r>b): every other optimal edit is linear in its unit's
    activation and starts at the identity, and a bias would give layer claims a capacity that head and neuron
    claims lack; r already carries near-constant directions through which <a, r> b can act as a shift.
    It acts on an activation that no weight produces alone, so it cannot be merged into the weights."""

    kind = "residual"

    def __init__(self, layers: LayerSet, arch: Arch, seed: int = 0, scale: float = 1.0):
        super().__init__()
        layers.validate(arch.n_layers)
        self.units = layers
        self.scale = float(scale)
        self.layers = list(layers.layers)
        g = torch.Generator().manual_seed(seed)
        self.a = nn.ParameterDict({str(l): nn.Parameter(_lora_a_init(arch.d_model, g)) for l in self.layers})
        self.b = nn.ParameterDict({str(l): nn.Parameter(torch.zeros(arch.d_model)) for l in self.layers})

    def _hooks(self, lm: LoadedModel) -> list:
        arch = lm.arch
        handles = []
        for l in self.layers:
            def hook(module, args, output, l=l):
                r = output[0] if isinstance(output, tuple) else output
                if not isinstance(r, torch.Tensor):
                    raise LocauditError(f"block {l} of this '{arch.model_type}' model returns {type(r).__name__}, not "
                                        f"hidden states; residual-stream edits do not support it")
                a, b = self.a[str(l)].to(r.dtype), self.b[str(l)].to(r.dtype)
                r = r + self.scale * (r @ a).unsqueeze(-1) * b
                return (r,) + tuple(output[1:]) if isinstance(output, tuple) else r
            handles.append(arch.block(l).register_forward_hook(hook))
        return handles

    def merge(self, lm: LoadedModel) -> None:
        raise LocauditError(f"the residual-stream edit at {self.units.spec()} is an activation edit (r <- r + s<a, r> b "
                            f"after a block), which no weight of the model holds; evaluate it attached "
                            f"(`with edit.attach(lm)`) instead of merging it")

    def is_identity(self) -> bool:
        return all(not bool(p.detach().any()) for p in self.b.values())

    def config(self) -> dict:
        return {"kind": self.kind, "layers": self.units.names, "label": self.units.label, "scale": self.scale}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"a.{l}": self.a[str(l)] for l in self.layers}, **{f"b.{l}": self.b[str(l)] for l in self.layers}}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for l in self.layers:
                for name, p in (("a", self.a[str(l)]), ("b", self.b[str(l)])):
                    t = tensors[f"{name}.{l}"]
                    if t.shape != p.shape:
                        raise ValueError(f"{name}.{l} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
                    p.copy_(t)


class FullRank1(Intervention):
    """Ordinary rank-1 LoRA on every layer's W^l: output += B^l (A^l o^l)  (the full-alignment baseline).
    `layers` restricts it to some layers (what PEFT's `layers_to_transform` does; used to compare with TRL)."""

    kind = "full"

    def __init__(self, arch: Arch, seed: int = 0, layers: list[int] | None = None, scale: float = 1.0):
        super().__init__()
        self.scale = float(scale)
        g = torch.Generator().manual_seed(seed)
        width = arch.n_heads * arch.head_dim
        self.all_layers = layers is None
        self.layers = list(range(arch.n_layers)) if layers is None else sorted(set(layers))
        bad = [l for l in self.layers if not 0 <= l < arch.n_layers]
        if bad:
            raise LocauditError(f"layer {bad[0]} is out of range: this model has layers 0..{arch.n_layers - 1}")
        self.A = nn.ParameterDict({str(l): nn.Parameter(_lora_a_init(width, g).view(1, width)) for l in self.layers})
        self.B = nn.ParameterDict({str(l): nn.Parameter(torch.zeros(arch.d_model, 1)) for l in self.layers})

    def _hooks(self, lm: LoadedModel) -> list:
        arch = lm.arch
        handles = []
        for l in self.layers:
            def hook(module, args, output, l=l):
                o = args[0]
                A, B = self.A[str(l)].to(o.dtype), self.B[str(l)].to(o.dtype)
                return output + self.scale * ((o @ A.t()) @ B.t())
            handles.append(arch.out_proj(l).register_forward_hook(hook))
        return handles

    def merge(self, lm: LoadedModel) -> None:
        for l in self.layers:
            W = lm.arch.W(l)
            lm.arch.add_to_W(l, (self.scale * self.B[str(l)].detach().float() @ self.A[str(l)].detach().float()).to(W.device))

    def is_identity(self) -> bool:
        return all(not bool(p.detach().any()) for p in self.B.values())

    def config(self) -> dict:
        if self.all_layers:
            return {"kind": self.kind, "heads": "all (full rank-1 LoRA)", "label": "full", "scale": self.scale}
        return {"kind": self.kind, "heads": f"all heads of layers {self.layers} (rank-1 LoRA)", "label": "layers",
                "layers": self.layers, "scale": self.scale}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"A.{l}": self.A[str(l)] for l in self.layers}, **{f"B.{l}": self.B[str(l)] for l in self.layers}}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for l in self.layers:
                self.A[str(l)].copy_(tensors[f"A.{l}"])
                self.B[str(l)].copy_(tensors[f"B.{l}"])


def import_peft(path: Path, arch: Arch) -> FullRank1:
    """A PEFT rank-1 LoRA adapter on the W^l (e.g. written by `locaudit export --peft`) as the FullRank1 on its
    layers with PEFT's factors and scaling: W^l <- W^l + scale B^l A^l, the same update PEFT applies, so the
    adapter is evaluated like any fitted edit. A localized edit comes back as this equivalent FullRank1
    (B^l = W^l b^l); its head set is not recorded in PEFT's format. A neuron edit's adapter (on W_down^l) is
    refused: no edit here but that NeuronRank1 applies its update."""
    lora = read_adapter(path, arch)
    all_layers = lora.layers == list(range(arch.n_layers))
    edit = FullRank1(arch, layers=None if all_layers else lora.layers, scale=lora.scale)
    edit.load_tensors({**{f"A.{l}": lora.A[l] for l in lora.layers}, **{f"B.{l}": lora.B[l] for l in lora.layers}})
    return edit


def _scale(meta: dict) -> float:
    return float(meta.get("scale", 1.0))


def _load_localized(meta: dict, tensors: dict, arch: Arch) -> Intervention:
    heads = parse_heads(meta["heads"], arch.n_layers, arch.n_heads, meta.get("label", "custom"))
    edit = LocalizedRank1(heads, arch, scale=_scale(meta))
    edit.load_tensors(tensors)
    return edit


def _load_full(meta: dict, tensors: dict, arch: Arch) -> Intervention:
    edit = FullRank1(arch, layers=meta.get("layers"), scale=_scale(meta))
    edit.load_tensors(tensors)
    return edit


def _load_iti(meta: dict, tensors: dict, arch: Arch) -> Intervention:
    heads = parse_heads(meta["heads"], arch.n_layers, arch.n_heads, meta.get("label", "custom"))
    u, sigma = tensors["u"], tensors["sigma"]
    if tuple(u.shape) != (len(heads), arch.head_dim) or tuple(sigma.shape) != (len(heads),):
        raise ValueError(f"u/sigma shapes {tuple(u.shape)}/{tuple(sigma.shape)} do not fit {len(heads)} heads of size {arch.head_dim}")
    # edits saved before placements existed shifted every position
    return ITI(heads, u, sigma, float(meta["alpha"]), placement=meta.get("placement", "all"))


def _load_neurons(meta: dict, tensors: dict, arch: Arch) -> Intervention:
    neurons = parse_neurons(meta["neurons"], arch.n_layers, arch.n_neurons, meta.get("label", "custom"))
    edit = NeuronRank1(neurons, arch, scale=_scale(meta))
    edit.load_tensors(tensors)
    return edit


def _load_residual(meta: dict, tensors: dict, arch: Arch) -> Intervention:
    edit = ResidualRank1(parse_layers(meta["layers"], arch.n_layers, meta.get("label", "custom")), arch, scale=_scale(meta))
    edit.load_tensors(tensors)
    return edit


# edit.json "kind" -> how to rebuild that edit from its edit.json and edit.safetensors
_LOADERS: dict[str, Callable[[dict, dict, Arch], Intervention]] = {
    "localized": _load_localized, "full": _load_full, "iti": _load_iti, "none": lambda meta, tensors, arch: NoEdit(),
    "neurons": _load_neurons, "residual": _load_residual,
}


def register_loader(kind: str, loader: Callable[[dict, dict, Arch], Intervention]) -> None:
    """Teach `load_intervention` an edit kind defined in a module built on this one (mean-difference steering in
    `locaudit.heuristics.steering` registers itself when imported, and importing any part of `locaudit` imports
    it), so that this module never imports the modules that import it. `loader(meta, tensors, arch)` rebuilds
    the edit from its edit.json and edit.safetensors."""
    old = _LOADERS.get(kind)
    if old is not None and (old.__module__, old.__qualname__) != (loader.__module__, loader.__qualname__):
        raise LocauditError(f"edit kind {kind!r} already has a loader ({old.__module__}.{old.__qualname__}); "
                            f"give the new edit another kind")
    _LOADERS[kind] = loader


def load_intervention(path: Path, arch: Arch) -> Intervention:
    """Load an edit saved by `Intervention.save` (a directory with edit.json and edit.safetensors), or a PEFT
    rank-1 LoRA adapter directory on the W^l (adapter_config.json; see `import_peft`)."""
    path = Path(path)
    if is_adapter_dir(path):
        return import_peft(path, arch)
    meta_path, tensor_path = path / "edit.json", path / "edit.safetensors"
    if not meta_path.is_file() or not tensor_path.is_file():
        raise LocauditError(f"{path} is not an edit directory (needs edit.json and edit.safetensors, or a PEFT "
                            f"adapter's adapter_config.json); run `locaudit fit --out {path}`")
    meta = read_json(meta_path)
    if not isinstance(meta, dict):
        raise LocauditError(f"{meta_path} is not an edit description (expected a JSON object); refit the edit")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise LocauditError(f"{tensor_path} is unreadable ({' '.join(str(e).split())[:160]}); refit the edit") from None
    kind = meta.get("kind")
    if not isinstance(kind, str) or kind not in _LOADERS:
        raise LocauditError(f"{meta_path} has unknown edit kind {kind!r}; expected {', '.join(_LOADERS)}")
    try:
        edit = _LOADERS[kind](meta, tensors, arch)
    except KeyError as e:
        raise LocauditError(f"edit in {path} lacks {e}; it is incomplete or from another version, refit it") from None
    except (RuntimeError, ValueError, TypeError) as e:  # shapes from another model, wrong types
        raise LocauditError(f"edit in {path} does not fit this model ({' '.join(str(e).split())[:160]}); "
                            f"use the model it was fitted on or refit it") from None
    return edit
