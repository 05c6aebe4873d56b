"""Which placeholder of the graph `backend="tbo"` compiles is which input of the user's call.

Two graphs stand between the user's call and the passes: dynamo's (one placeholder per input it
lifted: the call's tensors, the module's parameters and buffers, closure objects such as a
DeviceMesh) and aot_autograd's (the one the passes see). aot_autograd does not keep dynamo's
placeholders one for one: a tensor subclass input is flattened into its inner pieces (a DTensor
parameter becomes its local shard *and* its DeviceMesh, an opaque object), aliased inputs are
merged into one synthetic base, parameters it lifts itself come first. It says what each
placeholder is: `node.meta["desc"]`, an `AOTInput` descriptor (torch._functorch._aot_autograd.
descriptors): `PlainAOTInput(i)` is dynamo's input i, `ParamAOTInput(fqn)` a parameter,
`SubclassGetAttrAOTInput(base, attr)` one inner piece of the subclass input `base`. The mapping
below reads those descriptors and dynamo's input sources, never positions.

    inputs = AotInputs.of(aot_gm)
    picked = pick_token_inputs(dynamo_placeholders, examples, inputs.mutated_users(), wanted, module_state)
    tokens = inputs.token_placeholders(picked, dynamo_placeholders)   # aot placeholders, picked's order
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx

from tbo_compiler.ops.errors import TboCompileError
from tbo_compiler.passes.pipeline import TboFallbackWarning

_DYNAMO_NAME = re.compile(r"^L_(.*)_$")
_SOURCE_PART = re.compile(r"\[(?:'([^']*)'|(\d+))\]|\.(\w+)")
_CONTAINERS = {"_modules", "_parameters", "_buffers"}


def _source_name(placeholder: fx.Node) -> str | None:
    """Dynamo's source of a placeholder, e.g. "L['self']._modules['rotary']._buffers['inv_freq']"."""
    src = getattr(placeholder.meta.get("grapharg"), "source", None)
    if src is None:
        return None
    name = getattr(src, "name", None)
    name = name() if callable(name) else name   # a property in newer torch, a method in older
    return name if isinstance(name, str) else None


def user_name(placeholder: fx.Node | str) -> str:
    """The name a user knows an input by: input_ids (also when passed as **kwargs), args[0],
    model.layers.0.mlp.gate.weight; from dynamo's source, else from the placeholder's name."""
    src = _source_name(placeholder) if isinstance(placeholder, fx.Node) else None
    if src and src[:1] in "LG":
        parts: list[str | int] = []
        for key, idx, attr in _SOURCE_PART.findall(src[1:]):
            part = key or attr or int(idx)
            if part not in _CONTAINERS:
                parts.append(part)
        if parts[:1] in (["self"], ["kwargs"]) and len(parts) > 1:
            parts = parts[1:]
        if parts:
            out = ""
            for p in parts:
                out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
            return out
    target = str(placeholder.target) if isinstance(placeholder, fx.Node) else placeholder
    m = _DYNAMO_NAME.match(target)
    return m.group(1) if m else target


def is_module_state(placeholder: fx.Node) -> bool:
    """A dynamo placeholder for the module's own parameters or buffers (or a global, or an object
    the module's code closes over), not an input of the call: its source is rooted at `self`
    (e.g. L['self']._modules['rotary'].inv_freq) or at a global."""
    name = _source_name(placeholder) or str(placeholder.target)
    return name.startswith(("L['self']", "G[", "L_self_", "G_"))


def pick_token_inputs(names, examples, mutated, wanted, module_state=frozenset()) -> list[int]:
    """Dynamo input indices of the token inputs. `wanted`: the user's names or indices (an index
    counts the graph's tensor inputs in dynamo's order, module state left out, as the error
    message lists them); None: every tensor input of the call that is not mutated, with axis 0
    as long as the first one's."""
    users = [i for i, x in enumerate(examples)
             if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter) and i not in module_state]
    if wanted is not None:
        picked = []
        for w in wanted:
            if isinstance(w, int):
                if not -len(users) <= w < len(users):
                    raise TboCompileError(f"token input {w} is out of range: the compiled graph has "
                                          f"{len(users)} tensor inputs ({[user_name(names[i]) for i in users]})")
                picked.append(users[w])
            else:
                hit = [i for i in users if w in (user_name(names[i]), str(getattr(names[i], "target", names[i])))]
                if not hit:
                    raise TboCompileError(f"token input {w!r} is not an input of the compiled graph "
                                          f"(inputs: {[user_name(names[i]) for i in users]})")
                picked.extend(hit)
        flat = [user_name(names[i]) for i in picked if examples[i].dim() == 0]
        if flat:
            raise TboCompileError(f"token input {flat[0]!r} has no axis to split (a 0-d tensor)")
        return picked
    cands = [i for i in users if i not in mutated and examples[i].dim() >= 1]
    if not cands:
        return []
    T = examples[cands[0]].shape[0]
    return [i for i in cands if examples[i].shape[0] == T]


def _desc_name(desc, dynamo: list[fx.Node]) -> str:
    from torch._functorch._aot_autograd import descriptors as d

    if isinstance(desc, d.PlainAOTInput):
        return user_name(dynamo[desc.idx]) if desc.idx < len(dynamo) else f"args[{desc.idx}]"
    if isinstance(desc, (d.ParamAOTInput, d.BufferAOTInput)):
        return desc.target
    if isinstance(desc, d.SubclassGetAttrAOTInput):
        return f"{_desc_name(desc.base, dynamo)}.{desc.attr}"
    return desc.expr()


@dataclass(frozen=True)
class AotInputs:
    """aot_autograd's placeholders and, from its descriptors, what each one is.

    user[i] is the aot placeholder that holds dynamo input i's values: the placeholder itself for
    a plain tensor, the one inner tensor of a subclass (a DTensor's local shard); absent where
    none does (an input merged into a synthetic base, a subclass of several inner tensors)."""
    placeholders: tuple[fx.Node, ...]
    user: dict[int, fx.Node]
    names: dict[str, str]        # placeholder name -> what it is (input_ids, model.norm.weight, ...)
    described: bool              # False: aot gave no descriptors (nothing is mapped)

    @classmethod
    def of(cls, aot_gm: fx.GraphModule, dynamo_gm: fx.GraphModule | None = None) -> "AotInputs":
        from torch._functorch._aot_autograd import descriptors as d

        phs = tuple(n for n in aot_gm.graph.nodes if n.op == "placeholder")
        dynamo = [n for n in dynamo_gm.graph.nodes if n.op == "placeholder"] if dynamo_gm is not None else []
        described = bool(phs) and all("desc" in n.meta for n in phs)
        user: dict[int, fx.Node] = {}
        pieces: dict[int, list[fx.Node]] = {}
        names: dict[str, str] = {}
        for ph in phs:
            desc = ph.meta.get("desc")
            if desc is None:
                continue
            names[ph.name] = _desc_name(desc, dynamo)
            if isinstance(desc, d.PlainAOTInput):
                user[desc.idx] = ph
            elif isinstance(desc, d.SubclassGetAttrAOTInput) and isinstance(desc.base, d.PlainAOTInput) \
                    and isinstance(ph.meta.get("val"), torch.Tensor):
                pieces.setdefault(desc.base.idx, []).append(ph)
        for i, inner in pieces.items():   # a DTensor input: its local shard holds its rows
            if len(inner) == 1:
                user.setdefault(i, inner[0])
        return cls(phs, user, names, described)

    def user_index(self, ph: fx.Node) -> int | None:
        return next((i for i, p in self.user.items() if p is ph), None)

    def mutated_users(self) -> set[int]:
        """Dynamo inputs written in place (a trailing `copy_(placeholder, value)`, a KV cache)."""
        out = set()
        for ph in self.placeholders:
            for u in ph.users:
                if u.op == "call_function" and u.target == torch.ops.aten.copy_.default and u.args[0] is ph:
                    i = self.user_index(ph)
                    if i is not None:
                        out.add(i)
        return out

    def token_placeholders(self, picked: list[int], names, *, asked: bool = False) -> tuple[fx.Node, ...]:
        """The aot placeholders of the picked dynamo inputs (`names`: dynamo's placeholders). One
        without a placeholder of its own cannot be split: an error when the user `asked` for it,
        else the graph gets no token input (it runs unsplit, one warning says why)."""
        missing = [i for i in picked if i not in self.user]
        if missing:
            what = ", ".join(repr(user_name(names[i])) for i in missing)
            why = (f"token input {what} has no placeholder of its own in the aot graph "
                   + ("(aot_autograd gave no input descriptors)" if not self.described else
                      "(merged with an aliasing input, or a tensor subclass of several inner tensors)"))
            if asked:
                raise TboCompileError(why)
            warnings.warn(TboFallbackWarning(f"tbo: running this graph without TBO (unsplit): {why}"))
            return ()
        return tuple(self.user[i] for i in picked)

    def index(self, ph: fx.Node) -> int:
        return self.placeholders.index(ph)


__all__ = ["AotInputs", "is_module_state", "pick_token_inputs", "user_name"]
