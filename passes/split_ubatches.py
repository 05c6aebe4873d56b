"""Split the graph into two micro-batches (ubatches) along the token axis.

Contract
  requires   a functional ATen graph traced at T tokens, its `TokenAxes` record, and a cut
             0 < cut < T (the policy: `split_point`).
  guarantees every token-dependent node appears twice, once per ubatch (meta["tbo_ubatch"] = 0|1),
             computing on rows [0, cut) and [cut, T) of the token inputs; shared nodes (weights,
             their transforms) appear once (meta["tbo_ubatch"] = None); shape literals along the
             token axis are rewritten to the ubatch's size; token-indexed writes into shared state
             (KV caches) are chained: ubatch 0's writes, then ubatch 1's, so ubatch 1 sees ubatch
             0's rows (a request straddling the cut reads its prefix); mutated inputs get the
             final state. A token-axis output is one buffer allocated right after ubatch 0's part
             of it (`new_empty`), each ubatch's part copied into its rows as soon as it is made
             (`copy_` into a `slice` of the buffer), so a part is freed once written and the
             output costs its size plus one part, not twice its size (a `cat` of the parts holds
             both and the whole). An output that is a cast of a value only the output reads
             (fp32 logits of bf16 ones) is not computed per ubatch: the copy casts
             (`layout.folded`). Outputs laid out as several token blocks are still joined by `cat`.
  must not   change values: the split program equals the unsplit one up to float reassociation
             (it only changes which rows each op sees).

Pseudo-code
  Step 1 (classify): classify nodes (shared / per-ubatch / join), list state chains per base tensor.
  Step 1b (classify): the output casts to fold into the output writes.
  Step 2 (apply): emit placeholders and per-ubatch row slices of token inputs; emit shared nodes
          and ubatch 0's copies in program order, then ubatch 1's, then the joins (mutation
          epilogue; each token-axis output: buffer, ubatch 0's write, ubatch 1's write); rewrite
          token-axis shape literals in each copy.
  Step 3 (verify): re-run fake-tensor propagation on the new graph; every copy's shape must be
          the ubatch's size on its token axis, the op counts must double exactly (less the folded
          casts), and every written output must be covered by one write per ubatch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from tbo_compiler.ops.errors import SplitError, node_error
from tbo_compiler.passes.token_axis import (STATE, TokenAxes, TokenDim, has_sizes_arg, is_token_dependent,
                                            plain_factory, writes_rows)

aten = torch.ops.aten


def split_point(num_tokens: int, mode: str, tokens_per_request: int = 1) -> int:
    """Where the batch is cut. 0 means no split (every rank computes this from the same padded T).

    decode: by request, a request's (MTP) tokens kept together; prefill: token-balanced, a
    request may straddle the cut (its second part's positions already count the first part)."""
    if num_tokens <= 1:
        return 0
    if mode == "decode":
        k = max(1, tokens_per_request)
        if num_tokens % k:
            raise SplitError(f"decode batch of {num_tokens} tokens is not whole requests of {k} tokens")
        reqs = num_tokens // k
        return 0 if reqs < 2 else (reqs + 1) // 2 * k
    if mode == "prefill":
        return (num_tokens + 1) // 2
    raise SplitError(f"unknown split mode {mode!r} (prefill or decode)")


@dataclass(frozen=True)
class SplitLayout:
    T: int
    cut: int
    per_ubatch: tuple[str, ...]
    joins: tuple[str, ...]
    chains: tuple[tuple[str, ...], ...]  # state updates per base, program order
    folded: tuple[str, ...] = ()         # output casts done by the output writes (not per ubatch)

    @property
    def sizes(self) -> tuple[int, int]:
        return (self.cut, self.T - self.cut)


# Step 1 -------------------------------------------------------------------------------------

def _is_join(node: fx.Node, axes: TokenAxes) -> bool:
    if node.op == "output":
        return True
    return (node.target == aten.copy_.default and node.args[0].op == "placeholder"
            and is_token_dependent(axes[node]))


def classify_split(gm: fx.GraphModule, axes: TokenAxes, cut: int) -> SplitLayout:
    if not 0 < cut < axes.T:
        raise SplitError(f"cut {cut} is outside (0, {axes.T})")
    per, joins, chain_of, chains = [], [], {}, {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if _is_join(node, axes):
            joins.append(node.name)
            continue
        if node.op == "call_function" and is_token_dependent(axes[node]):
            per.append(node.name)
            if axes[node] is STATE and writes_rows(node.target):
                base = node.args[0]
                root = chain_of.get(base.name, base.name) if axes[base] is STATE else base.name
                if axes[base] is STATE and base.name not in chain_of:
                    raise node_error(SplitError, node, "updates state reached through a view; "
                                                       "write the cache tensor directly")
                chain_of[node.name] = root
                chains.setdefault(root, []).append(node.name)
    return SplitLayout(axes.T, cut, tuple(per), tuple(joins), tuple(tuple(c) for c in chains.values()),
                       _folded_casts(gm, axes, set(per)))


_CASTS = (aten._to_copy.default, torch.ops.prims.convert_element_type.default)


def _written_output(v, axes: TokenAxes) -> bool:
    """A graph output joined by writing both ubatches' rows into one buffer (not by `cat`)."""
    ax = axes[v]
    return isinstance(ax, TokenDim) and ax.outer == 1


def _folded_casts(gm: fx.GraphModule, axes: TokenAxes, per: set[str]) -> tuple[str, ...]:
    """Step 1b: outputs that are a dtype cast read by nothing but the output: `copy_` casts, so
    each ubatch's pre-cast rows are copied into the output buffer and the cast half never exists."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    folded = []
    for v in out.all_input_nodes:
        if v.target not in _CASTS or v.name not in per or not _written_output(v, axes):
            continue
        src = v.args[0]
        sv, vv = src.meta.get("val"), v.meta.get("val")
        kw = dict(v.kwargs)
        kw.pop("dtype", None)
        plain = (kw.pop("layout", torch.strided) in (None, torch.strided)
                 and kw.pop("device", None) in (None, getattr(sv, "device", None))
                 and kw.pop("memory_format", None) in (None, torch.preserve_format, torch.contiguous_format)
                 and not kw and len(v.args) == (2 if v.target == _CASTS[1] else 1))
        if (plain and set(v.users) == {out} and isinstance(sv, torch.Tensor) and isinstance(vv, torch.Tensor)
                and sv.shape == vv.shape and src.name in per
                and isinstance(axes[src], TokenDim)
                and (axes[src].axis, axes[src].outer, axes[src].inner) == (axes[v].axis, 1, axes[v].inner)):
            folded.append(v.name)
    return tuple(folded)


# Step 2 -------------------------------------------------------------------------------------

def _rewrite_shape_args(node: fx.Node, old: fx.Node, axes: TokenAxes, T: int, Tu: int) -> None:
    ax = axes[old]
    t = old.target

    if has_sizes_arg(t):
        if isinstance(ax, TokenDim):
            size = list(node.args[1])
            want = ax.size(T)
            if size[ax.axis] not in (-1, want):
                raise node_error(SplitError, old, f"size {size} disagrees with the token axis")
            size[ax.axis] = -1 if size[ax.axis] == -1 else ax.size(Tu)
            node.args = (node.args[0], size, *node.args[2:])
    elif t == aten.slice.Tensor and isinstance(ax, TokenDim):
        args = list(node.args)
        dim = args[1] if len(args) > 1 else 0
        rank = len(old.args[0].meta["val"].shape)
        if dim % rank == ax.axis and len(args) > 3 and args[3] is not None and args[3] < 2 ** 62:
            args[3] = ax.size(Tu)  # the token rule allows only full slices along tokens
            node.args = tuple(args)
    elif t in (aten.split.Tensor, aten.split_with_sizes.default) and isinstance(axes[old.args[0]], TokenDim):
        src = axes[old.args[0]]  # along the token axis only in whole outer blocks (an all_gather's ranks)
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if dim % len(old.args[0].meta["val"].shape) == src.axis:
            sizes = node.args[1]
            block, ublock = src.size(T) // src.outer, src.size(Tu) // src.outer
            new = [s // block * ublock for s in sizes] if isinstance(sizes, (list, tuple)) else sizes // block * ublock
            node.args = (node.args[0], new, *node.args[2:])
    elif t == aten.native_group_norm.default and isinstance(ax, tuple) and isinstance(ax[0], TokenDim):
        node.args = (*node.args[:3], ax[0].size(Tu), *node.args[4:])  # (x, w, b, N, C, HxW, groups, eps)
    elif t == torch.ops._c10d_functional.all_to_all_single.default:
        a = list(node.args)
        for k in (1, 2):
            if a[k] is not None:
                if any(s % T for s in a[k]):
                    raise node_error(SplitError, old, f"all_to_all split sizes {a[k]} are not token multiples")
                a[k] = [s // T * Tu for s in a[k]]
        node.args = tuple(a)


def apply_split(gm: fx.GraphModule, axes: TokenAxes, layout: SplitLayout) -> fx.GraphModule:
    T, cut = layout.T, layout.cut
    sizes = layout.sizes
    per = set(layout.per_ubatch)
    joins = set(layout.joins)
    folded = set(layout.folded)
    last_of_chain = {c[0]: c[-1] for c in layout.chains}
    chain_root = {n: c[0] for c in layout.chains for n in c}
    new = fx.Graph()
    shared: dict[str, fx.Node] = {}
    ub: list[dict[str, fx.Node]] = [{}, {}]
    old_nodes = {n.name: n for n in gm.graph.nodes}

    def final_state(name: str) -> fx.Node:
        root = chain_root.get(name)
        if root is None or last_of_chain[root] != name:
            raise node_error(SplitError, old_nodes[name], "reads a token-updated tensor before its last update")
        return ub[1][name]

    aligned = axes.aligned or {}
    renumbered = axes.renumbered or {}
    rows: dict[tuple, fx.Node] = {}

    def rows_of(n: fx.Node, ax: TokenDim, u: int) -> fx.Node:
        """Ubatch u's rows of a shared tensor whose axis `ax.axis` is laid out [outer][T][inner]."""
        key = (n.name, ax, u)
        if key not in rows:
            lo, hi = (0, cut) if u == 0 else (cut, T)
            shape = list(n.meta["val"].shape)
            src = shared[n.name]
            if ax.outer == 1:
                r = new.call_function(aten.slice.Tensor, (src, ax.axis, lo * ax.inner, hi * ax.inner))
            else:  # [.., o*T*i, ..] -> [.., o, T, i, ..] -> rows -> [.., o*Tu*i, ..]
                v = new.call_function(aten.reshape.default, (src, shape[:ax.axis] + [ax.outer, T, ax.inner] + shape[ax.axis + 1:]))
                v.meta = {"tbo_ubatch": u, "tbo_role": "aligned_rows"}
                sl = new.call_function(aten.slice.Tensor, (v, ax.axis + 1, lo, hi))
                sl.meta = {"tbo_ubatch": u, "tbo_role": "aligned_rows"}
                r = new.call_function(aten.reshape.default, (sl, shape[:ax.axis] + [ax.size(hi - lo)] + shape[ax.axis + 1:]))
            r.meta = {"tbo_ubatch": u, "tbo_role": "aligned_rows", "stack_trace": n.meta.get("stack_trace")}
            rows[key] = r
        return rows[key]

    def iota_of(n: fx.Node, ax: TokenDim, u: int) -> fx.Node:
        """Ubatch u's own arange(rows) in place of a shared arange numbering the token rows."""
        key = (n.name, "iota", u)
        if key not in rows:
            # arange(end) and Inductor's prims.iota(length, start=0, step=1) hold the length first
            end = 0 if n.target in (aten.arange.default, torch.ops.prims.iota.default) else 1
            args = list(n.args)
            args[end] = ax.size(sizes[u])
            r = new.call_function(n.target, tuple(args), dict(n.kwargs))
            r.meta = {"tbo_ubatch": u, "tbo_role": "iota", "stack_trace": n.meta.get("stack_trace")}
            rows[key] = r
        return rows[key]

    def lookup(n: fx.Node, u: int | None) -> fx.Node:
        if u is not None and n.name in ub[u]:
            return ub[u][n.name]
        if n.name in shared:
            return shared[n.name]
        if u is None:
            if axes[n] is STATE:
                return final_state(n.name)
            raise node_error(SplitError, n, "a value the pass took for shared depends on the tokens")
        return ub[u][n.name]

    # Step 2a: placeholders and row slices of the token inputs
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        p = new.placeholder(node.name, type_expr=node.type)
        p.meta = dict(node.meta)
        p.meta["tbo_ubatch"] = None
        shared[node.name] = p
        if isinstance(axes[node], TokenDim):
            for u, (lo, hi) in enumerate(((0, cut), (cut, T))):
                s = new.call_function(aten.slice.Tensor, (p, 0, lo, hi))
                s.meta = {"tbo_ubatch": u, "tbo_role": "split_input", "stack_trace": node.meta.get("stack_trace")}
                ub[u][node.name] = s

    def emit(node: fx.Node, u: int | None) -> fx.Node:
        if u is None and plain_factory(node.target) and is_token_dependent(axes[node.args[0]]):
            # new_empty(x, size) with a token tensor x reads only x's dtype and device: make it
            # a plain factory so the shared buffer does not wait on either ubatch
            tmpl = node.args[0].meta["val"]
            kw = {"dtype": node.kwargs.get("dtype") or tmpl.dtype, "device": node.kwargs.get("device") or tmpl.device}
            op, args = plain_factory(node.target), (list(node.args[1]), *node.args[2:])
            c = new.call_function(op, args, kw)
            c.meta = dict(node.meta)
            c.meta.pop("val", None)
            c.meta.update(tbo_ubatch=None, tbo_origin=node.name)
            return c
        if u is not None and writes_rows(node.target) and node.name in chain_root:
            root = chain_root[node.name]
            first = root == node.name
            if u == 1 and first:  # ubatch 1's first write goes on top of ubatch 0's last
                base = ub[0][last_of_chain[root]]
                c = new.node_copy(node, lambda n: base if n is node.args[0] else lookup(n, u))
            else:
                c = new.node_copy(node, lambda n: lookup(n, u))
        elif u is not None and any((node.name, a.name) in aligned or (node.name, a.name) in renumbered
                                   for a in node.all_input_nodes):
            def arg(n):
                if (node.name, n.name) in aligned:
                    return rows_of(n, aligned[(node.name, n.name)], u)
                if (node.name, n.name) in renumbered:
                    return iota_of(n, renumbered[(node.name, n.name)], u)
                return lookup(n, u)
            c = new.node_copy(node, arg)
        else:
            c = new.node_copy(node, lambda n: lookup(n, u))
        c.meta = dict(node.meta)
        c.meta.pop("val", None)
        c.meta["tbo_ubatch"] = u
        c.meta["tbo_origin"] = node.name
        if u is not None:
            _rewrite_shape_args(c, node, axes, T, sizes[u])
        return c

    body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and n.name not in joins]
    for node in body:  # shared nodes + ubatch 0 (a folded cast: done by the output write)
        if node.name in per:
            if node.name not in folded:
                ub[0][node.name] = emit(node, 0)
        else:
            shared[node.name] = emit(node, None)
    for node in body:  # ubatch 1
        if node.name in per and node.name not in folded:
            ub[1][node.name] = emit(node, 1)

    # Step 2c: joins
    out_node = None
    for node in gm.graph.nodes:
        if node.name not in joins:
            continue
        if node.op == "output":
            out_node = node
            continue
        shared[node.name] = emit(node, None)

    written: dict[str, fx.Node] = {}

    def write_output(v: fx.Node, ax: TokenDim) -> fx.Node:
        """Step 2d: the output buffer, allocated once ubatch 0's part exists (`new_empty` of that
        part: the dependency places it there, and it is ubatch 0's work), and each ubatch's
        part copied into its rows right after it is made (`copy_` casts a folded cast's source)."""
        if v.name in written:
            return written[v.name]
        val = v.meta["val"]
        parts = [ub[u][v.args[0].name] if v.name in folded else ub[u][v.name] for u in (0, 1)]
        buf = new.call_function(aten.new_empty.default, (parts[0], list(val.shape)), {"dtype": val.dtype})
        buf.meta = {"tbo_ubatch": 0, "tbo_role": "join_output", "stack_trace": v.meta.get("stack_trace")}
        for u, (lo, hi) in enumerate(((0, cut), (cut, T))):
            rows = new.call_function(aten.slice.Tensor, (buf, ax.axis, lo * ax.inner, hi * ax.inner))
            rows.meta = {"tbo_ubatch": u, "tbo_role": "join_output"}
            w = new.call_function(aten.copy_.default, (rows, parts[u]))
            w.meta = {"tbo_ubatch": u, "tbo_role": "join_output"}
        written[v.name] = buf
        return buf

    def join_value(v):
        if not isinstance(v, fx.Node):
            return v
        if v.name in shared:
            return shared[v.name]
        ax = axes[v]
        if ax is STATE:
            return final_state(v.name)
        if isinstance(ax, TokenDim):
            if _written_output(v, axes):
                return write_output(v, ax)
            # [.., o*Tu*i, ..] per ubatch (e.g. all_gathered rows, saved for backward): view each
            # as [.., o, Tu*i, ..], join the token rows of every block, flatten back
            shape = list(v.meta["val"].shape)
            parts = []
            for u in (0, 1):
                p = new.call_function(aten.reshape.default, (ub[u][v.name], shape[:ax.axis] + [ax.outer, sizes[u] * ax.inner] + shape[ax.axis + 1:]))
                p.meta = {"tbo_ubatch": u, "tbo_role": "join_output"}
                parts.append(p)
            c = new.call_function(aten.cat.default, (parts, ax.axis + 1))
            c.meta = {"tbo_ubatch": None, "tbo_role": "join_output"}
            r = new.call_function(aten.reshape.default, (c, shape))
            r.meta = {"tbo_ubatch": None, "tbo_role": "join_output"}
            return r
        raise node_error(SplitError, v, f"graph output is {ax}, which cannot be joined")

    outs = fx.node.map_aggregate(out_node.args[0], join_value)
    o = new.output(outs)
    o.meta = dict(out_node.meta)
    new.lint()
    res = fx.GraphModule(gm, new)
    res.meta.update(getattr(gm, "meta", {}))
    return res


# Step 3 -------------------------------------------------------------------------------------

def _to_meta(v):
    if isinstance(v, torch.Tensor):
        return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
    return v


def propagate_meta(gm: fx.GraphModule) -> None:
    """Re-run every op on meta tensors (shapes and dtypes only, ~20 us an op) and store the result
    in meta['val']: a full type-check of the graph, ~50x cheaper than fake-tensor propagation."""
    import operator as _op

    env: dict[str, object] = {}

    def load(n):
        return env[n.name]

    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n.name] = _to_meta(n.meta["val"])
        elif n.op == "get_attr":  # a constant held by the graph
            obj = gm
            for part in n.target.split("."):
                obj = getattr(obj, part)
            env[n.name] = _to_meta(obj)
            n.meta["val"] = env[n.name]
        elif n.op == "call_function":
            args = fx.node.map_arg(n.args, load)
            kwargs = fx.node.map_arg(n.kwargs, load)
            schema = getattr(n.target, "_schema", None)
            if "device" in kwargs or (schema is not None and any(a.name == "device" for a in schema.arguments)):
                kwargs = {**kwargs, "device": torch.device("meta")}  # factories: default device too
            try:
                out = _op.getitem(*args) if n.target is _op.getitem else n.target(*args, **kwargs)
            except Exception as e:
                raise node_error(SplitError, n, f"does not type-check after the split "
                                                f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
            env[n.name] = out
            n.meta["val"] = out


def verify_split(old: fx.GraphModule, new: fx.GraphModule, axes: TokenAxes, layout: SplitLayout) -> None:
    propagate_meta(new)  # raises, naming the node, where a rewritten shape does not fit
    old_by = {n.name: n for n in old.graph.nodes}
    count = {0: 0, 1: 0}
    for n in new.graph.nodes:
        u = n.meta.get("tbo_ubatch")
        origin = n.meta.get("tbo_origin")
        if u is None or origin is None:
            continue
        count[u] += 1
        ax = axes[old_by[origin]]
        v = n.meta.get("val")
        if isinstance(ax, TokenDim) and isinstance(v, torch.Tensor):
            want = ax.size(layout.sizes[u])
            if v.shape[ax.axis] != want:
                raise node_error(SplitError, n, f"ubatch {u} has {v.shape[ax.axis]} rows on the token "
                                                f"axis, expected {want}")
    want = len(layout.per_ubatch) - len(layout.folded)
    if count[0] != count[1] or count[0] != want:
        raise SplitError(f"split emitted {count} per-ubatch nodes for {want} token-dependent ones "
                         f"({len(layout.folded)} output casts folded into the output writes)")
    _verify_output_writes(new, layout)


def _verify_output_writes(new: fx.GraphModule, layout: SplitLayout) -> None:
    """Every output buffer is written by one copy per ubatch, ubatch u's into its own rows, and
    nothing else writes or reads it before the output."""
    out = next(n for n in new.graph.nodes if n.op == "output")
    for buf in out.all_input_nodes:
        if buf.target != aten.new_empty.default or buf.meta.get("tbo_role") != "join_output":
            continue
        axis = next((u.args[1] for u in buf.users if u.target == aten.slice.Tensor), 0)
        inner = buf.meta["val"].shape[axis] // layout.T
        spans = {}
        for rows in buf.users:
            if rows is out:
                continue
            u = rows.meta.get("tbo_ubatch")
            writes = list(rows.users)
            if (rows.target != aten.slice.Tensor or rows.args[1] != axis or u in spans or len(writes) != 1
                    or writes[0].target != aten.copy_.default or writes[0].args[0] is not rows
                    or writes[0].meta.get("tbo_ubatch") != u or writes[0].users):
                raise node_error(SplitError, rows, "is not one ubatch's write into an output buffer")
            spans[u] = tuple(rows.args[2:4])
        lo, hi = (0, layout.cut * inner), (layout.cut * inner, layout.T * inner)
        if spans != {0: lo, 1: hi}:
            raise node_error(SplitError, buf, f"output rows written {spans}, expected ubatch 0 {lo}, ubatch 1 {hi}")


def split_ubatches(gm: fx.GraphModule, axes: TokenAxes, cut: int) -> tuple[fx.GraphModule, SplitLayout]:
    layout = classify_split(gm, axes, cut)
    new = apply_split(gm, axes, layout)
    verify_split(gm, new, axes, layout)
    return new, layout


__all__ = ["split_point", "SplitLayout", "classify_split", "apply_split", "verify_split", "split_ubatches",
           "propagate_meta"]
