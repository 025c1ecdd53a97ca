"""Optional compiled decoding forwards for :class:`clover.model.base.BaseModel` (``torch.compile``, inductor).

Decoding runs one forward per step over few tokens, and in eager mode a third of that forward is not the weights'
arithmetic but ~25 small ops per layer, each a Python call and a dispatch, with the weights streaming through the
caches in between. Compiled, a forward becomes one graph: the norms, RoPE, SiLU and residual adds fuse into a few
C++ loops around the matmuls, and the graph runs from C++ (inductor's ``cpp_wrapper``), with no Python between ops.

Two graphs, each compiled once: the forward of one token without a tree mask (plain decoding's step), and the
forward of a tree of two or more tokens with its mask (speculative verification). Both run after a non-empty batch-1
cache; each layer's whole keys/values are graph inputs of fixed shapes (the graph reads them up to the last new
slot), the new keys/values are written in place at their slots, and the cache's length comes in as the size of a
zero-element tensor: the number of tokens and that length are the graphs' only dynamic sizes, so one graph serves
every length with no recompilation and no copy of the cache. Every other forward (prompts, batches, autograd)
stays eager. The matmuls use the runtime's kernels (:class:`~clover.model.kernels.PrepackedLinear`: the weights
prepacked for several rows, and for one the kernel measured as the faster on this CPU); the graphs assume the weights
no longer change.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from clover.model.kernels import PrepackedLinear, few_rows_kernel, one_row_kernel

_kernels_routed: bool | None = None


def route_packed_matmuls() -> bool:
    """Let compiled graphs call oneDNN's matmul on a weight packed at run time straight from inductor's C++ wrapper.

    Inductor lowers ``mkldnn._linear_pointwise`` (and the ``.binary`` form its pattern passes make by fusing an add
    into it) only for weights it packed itself as graph constants (freezing). This turns the op on any other weight
    into a plain fallback kernel, which the C++ wrapper calls through the dispatcher, and leaves the constant case
    to inductor. The alternative, an opaque Python op, costs ~40 µs a call: ~5 ms per tree forward of SmolLM2
    (121 matmuls). It uses inductor's private lowering table, so on any failure the graphs keep the Python op
    (the same numbers, slower). Returns whether the kernels are routed; idempotent."""
    global _kernels_routed
    if _kernels_routed is None:
        _kernels_routed = _route_packed_matmuls()
    PrepackedLinear.kernel_in_graph = _kernels_routed
    return _kernels_routed


def _route_packed_matmuls() -> bool:
    try:
        from torch._inductor import lowering
        from torch._inductor.virtualized import V

        ops = torch.ops.mkldnn._linear_pointwise
        try:  # an add fused in: same shape as the product (no fake kernel of its own in torch)
            torch.library.register_fake("mkldnn::_linear_pointwise.binary")(
                lambda x, other, w, b, attr: x.new_empty((*x.shape[:-1], w.shape[0])))
        except RuntimeError:  # one is registered already
            pass
        for op, weight_arg in ((ops.default, 1), (ops.binary, 2)):
            own, fallback = lowering.lowerings[op], lowering.fallback_handler(op, add_to_fallback_set=False)

            def lower(*args, _own=own, _fallback=fallback, _w=weight_arg, **kwargs):
                packed_by_inductor = args[_w].get_name() in V.graph.constants
                return (_own if packed_by_inductor else _fallback)(*args, **kwargs)
            lowering.lowerings[op] = lower
        return True
    except Exception:  # noqa: BLE001 -- private API moved: the slower, always-correct path
        return False


class _LayerViews:
    """Stands in for the cache inside a compiled graph: layer ``i``'s keys/values are ``ks[i]``, ``vs[i]`` (the
    whole capacity), the new tokens' keys/values go to the slots ``slots``, and attention reads slots ``0..end-1``."""

    def __init__(self, ks, vs, slots, end):
        self.ks, self.vs, self.slots, self.end = ks, vs, slots, end

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        k_all, v_all = self.ks[layer], self.vs[layer]
        k_all.index_copy_(2, self.slots, k)
        v_all.index_copy_(2, self.slots, v)
        return k_all[:, :, :self.end], v_all[:, :, :self.end]


def _forward(model: nn.Module, input_ids, cos, sin, mask, slots, span, ks, vs):
    cache = _LayerViews(ks, vs, slots, span.shape[0])
    x = model.model.embed_tokens(input_ids)
    for i, layer in enumerate(model.model.layers):
        x = layer(x, cos, sin, mask, cache, i, 0)
    hidden = model.model.norm(x)
    return x, hidden, model.logits_head(hidden, model.lm_head.weight)


def _token_forward(*args):  # two functions: torch.compile keeps its graphs per code object
    return _forward(*args)


def _tree_forward(*args):
    return _forward(*args)


def _argument_guards(entries) -> list[bool]:
    """Keep only the guards on the tensors a call passes besides the model (ids, RoPE rows, mask, slots, length,
    cache): ``guard_filter_fn`` of the graphs (the model is their first argument)."""
    return [e.guard_type == "TENSOR_MATCH" and not e.name.startswith(("args[0]", "L['args'][0]")) for e in entries]


def _own_copy(fn):
    """``fn`` with a code object of its own. torch.compile keeps its graphs on the code object, at most
    ``recompile_limit`` (8) of them; with a copy per :class:`CompiledDecode`, the graphs of many models in one
    process (a test suite, say) never pile up on one code object, past whose limit dynamo stops compiling."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class CompiledDecode:
    """``model``'s decoding forwards compiled (each at its first call), reading and writing ``model.cache`` in
    place. ``calls`` counts the forwards that ran compiled.

    Each instance's graphs serve its one model, called the same way every time (another ``torch.compile`` never
    reuses them: dynamo matches the compiling call as well as the guards), so a call checks only the guards on the
    tensors it is given besides the model (shapes, strides and dtypes of the ids, RoPE rows, mask, slots, length and
    cache views); the guards on the model's structure, weights and packed weights are dropped. Dynamo's lookup before
    a call, measured on a tiny 30-layer model: 0.05 ms; it was 0.3 / 0.9 ms (one token / a tree) while the graphs
    guarded the packed weights, the tree graph every guard (``torch.compile`` pops the filter from its options, and
    the two graphs shared one dict) and each layer's cache came in cut to the call's length (sizes, strides and
    offsets turned symbols, ~2,000 guards between them)."""

    def __init__(self, model: nn.Module):
        self.model = model
        route_packed_matmuls()
        one_row_kernel()  # measured now, not while a graph is traced (the graphs bake the choice in)
        few_rows_kernel()  # (the graphs use the packed weight for several rows; measured now all the same)
        self.token_step, self.tree_step = (
            torch.compile(_own_copy(fn), fullgraph=True, dynamic=False,  # options: a dict each (compile pops from it)
                          options={"cpp_wrapper": True, "guard_filter_fn": _argument_guards})
            for fn in (_token_forward, _tree_forward))
        self.compiled = set()
        self.calls = 0
        self._views_of = self.span = self.ks = self.vs = None  # set at the first call (see __call__)

    def __call__(self, input_ids: torch.Tensor, past: int, positions: torch.Tensor | None,
                 mask: torch.Tensor | None):
        """The forward of ``input_ids [1, T]`` after ``past`` cached tokens, at ``positions [T]`` (None: the slots)
        with the additive mask ``mask [T, past + T]`` (None: one token that sees everything)."""
        model, cache = self.model, self.model.cache
        t = input_ids.shape[1]
        input_ids = input_ids.reshape(t)[None]  # the same strides whatever view came in (the graphs guard on them)
        end = past + t
        slots = torch.arange(past, end, device=input_ids.device)
        if self._views_of is not cache.k:  # the model's cache (re)allocated: its layers' views, once
            self._views_of, self.span = cache.k, torch.empty(cache.k.shape[3], 0, device=cache.k.device)
            self.ks, self.vs = list(cache.k.unbind()), list(cache.v.unbind())
        span = self.span[:end]
        cos, sin = model.rotary(slots if positions is None else positions, model.dtype)
        kind = "token" if mask is None else "tree"
        if kind not in self.compiled:  # marking is for the compilation only. "maybe": a graph may still
            # specialize a range (a recompile then, never an error)
            torch._dynamo.maybe_mark_dynamic(span, 0)
            if mask is not None:
                for tensor, dims in ((input_ids, (1,)), (slots, (0,)), (cos, (1,)), (sin, (1,)), (mask, (0, 1))):
                    for dim in dims:
                        torch._dynamo.maybe_mark_dynamic(tensor, dim)
        step = self.token_step if mask is None else self.tree_step
        out = step(model, input_ids, cos, sin, mask, slots, span, self.ks, self.vs)
        self.compiled.add(kind)
        self.calls += 1
        return out
