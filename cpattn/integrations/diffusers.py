"""diffusers models on cpattn: their attention on cpattn's provider, and context parallelism by the model's plan.

One device (every attention call of the model runs on the active cpattn provider)::

    from cpattn.integrations.diffusers import use_cpattn
    with use_cpattn(), cpattn.attention_provider("cudnn"):
        image = pipe(prompt).images[0]

Context parallel (under torchrun; the pipeline, the scheduler and the VAE run as without it, on every rank)::

    from cpattn.integrations.diffusers import parallelize
    mesh = init_device_mesh("cuda", (world_size,))
    parallelize(pipe.transformer, mesh, provider="flash")
    video = pipe(prompt, generator=torch.Generator().manual_seed(0)).frames   # the same seed on every rank

How it hooks into diffusers:

* Attention. Inside ``use_cpattn()`` every member of diffusers' ``AttentionBackendName`` that its
  ``_AttentionBackendRegistry`` holds maps to one function, `cpattn_backend`, which takes diffusers' (B, S, H, D)
  layout, hands (B, H, S, D) to ``cpattn.attention_dispatch`` and returns (B, S, H, D). Every member, not only
  ``native``: a model set to another member (``model.set_attention_backend("flash")``) would otherwise run that
  kernel on its own, outside the provider and, under context parallelism, on this rank's shard alone. Processors
  that call ``F.scaled_dot_product_attention`` themselves (UNets, PixArt, SD3: ``AttnProcessor2_0`` and kin) reach
  cpattn through `cpattn_sdpa`, put in its place for the block. diffusers passes attn_mask (a (B, S_kv) key mask
  is widened to (B, 1, 1, S_kv), as its native backend does), dropout_p, is_causal, scale and enable_gqa; they
  go to cpattn unchanged. ``return_lse=True`` and a processor's ``_parallel_config`` (diffusers' own context
  parallelism, ``enable_parallelism``) are refused. Keyword arguments a model puts in ``attention_kwargs`` beyond
  those are dropped by diffusers' dispatcher before any backend sees them, as for its own backends.
* Sharding. `parallelize` reads the model's ``_cp_plan`` (diffusers' ``ContextParallelInput`` /
  ``ContextParallelOutput`` per submodule) and applies it with cpattn's layout (zigzag unless ``cp_layout`` says
  otherwise), through forward hooks: inputs split where the plan splits them (Wan: after patchify and RoPE, at
  ``blocks.0`` and RoPE's output, not the latent), outputs gathered where it gathers them (differentiably), so the
  model takes and returns whole tensors. Each forward runs inside ``use_cpattn()`` and
  ``attention_provider(provider, cp_mesh=mesh, ...)``: a forward whose attention never reaches cpattn raises
  ``cpattn.NoAttentionCallError`` on every rank.
* Joint attention (Flux: text and image tokens in one sequence) keeps the text whole on every rank, in front of
  each rank's image shard: Flux's plan loses its text splits and the text length becomes
  ``cp_replicated_prefix``. SD3 (no ``_cp_plan``; the integration's plan shards the blocks' input and gathers
  ``proj_out``'s output) puts the text after the image: its length becomes ``cp_replicated_suffix``. SD3.5's
  ``dual_attention_layers`` (a second attention over the image alone) are refused. Cross-attention to text (Wan, PixArt: modules with ``is_cross_attention``) is
  declared ``kv_replicated`` for every call made inside those modules.
* Models whose convolutions or GroupNorm span the sequence (UNets) cannot be served by attention-only context
  parallelism: `parallelize` raises `UnservableModelError` naming the model. Their attention still runs on
  cpattn on one device through ``use_cpattn()``.

Tested: Flux, Wan, PixArt and SD3 under `parallelize` at 1, 2 and 3 ranks; UNet2DConditionModel, Flux and Wan through
``use_cpattn()`` on one device, where torch.compile keeps cpattn's op in the graph. Another model's ``_cp_plan``
is used as it stands; run `check_parity` on it before trusting it (a plan that keeps text whole in joint attention
without declaring it as the prefix counts that text once per rank). The route is process-wide: while a block is
open, every thread's diffusers attention goes to cpattn.

Gradients under `parallelize`: a gathered output's gradient is taken to be the same on every rank (a loss
computed alike on every rank), each rank keeps its own rows of it, and the parameters' gradients are each rank's
share: all-reduce them with SUM over the mesh. Gradient checkpointing is refused (its recomputation runs in the
backward, outside the forward's context-parallel block). `check_parity` compares a few steps with one process.

Versions: tested with diffusers 0.42.1 (the ``dev`` extra pins it). Expected to work with diffusers >= 0.36, < 0.43:
it relies on ``_AttentionBackendRegistry``'s ``_backends``, ``_constraints`` and ``_supported_arg_names``, on
processors' ``_parallel_config`` and on ``_cp_plan`` with ``ContextParallelInput`` / ``ContextParallelOutput``,
which those releases keep. Other versions warn on import.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import diffusers
import torch
import torch.nn.functional as F
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention_dispatch import _AttentionBackendRegistry

from ..cp import gather_sequence, shard_sequence
from ..dispatch import attention_dispatch
from ..errors import InvalidArgumentError, UnsupportedInputError
from ..state import CP_OPTIONS, attention_provider
from . import parity

__all__ = [
    "CPPlan", "TESTED_VERSION", "UnservableModelError", "check_parity", "cpattn_backend", "cpattn_sdpa",
    "is_parallelized", "parallelize", "plan_for", "unparallelize", "use_cpattn",
]

TESTED_VERSION = "0.42.1"
_SUPPORTED = ((0, 36), (0, 43))  # [low, high) on (major, minor)


def _minor(version: str) -> tuple[int, int]:
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in (version.split(".") + ["0"])[:2])


if not _SUPPORTED[0] <= _minor(diffusers.__version__) < _SUPPORTED[1]:
    warnings.warn(f"cpattn.integrations.diffusers is written for diffusers >= 0.36, < 0.43 (tested with "
                  f"{TESTED_VERSION}); diffusers {diffusers.__version__} is installed", stacklevel=2)


# -- attention: diffusers' calls to cpattn ----------------------------------------------------------------------

# Inside a parallelized forward: "sharded", or "replicated" inside a cross-attention module. None outside any
# parallelized forward: cpattn's own rule applies (a key length unlike the query's means replicated key/value).
_SITE: contextvars.ContextVar[str | None] = contextvars.ContextVar("cpattn_diffusers_site", default=None)
# Parallelized forwards running now (all threads). torch.compile cannot read the ContextVar: with none running, the
# one-device path never asks it, so that a compiled model keeps attention in its graph.
_open_forwards = 0
_FORWARDS_LOCK = threading.Lock()


def _count_forward(delta: int) -> None:
    global _open_forwards
    with _FORWARDS_LOCK:
        _open_forwards += delta


def _attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> torch.Tensor:
    """(B, H, S, D) attention on cpattn, with the call site's kv_replicated."""
    site = _SITE.get() if _open_forwards else None
    if site is None:
        return attention_dispatch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if site == "sharded" and query.shape[-2] != key.shape[-2]:
        # cpattn would read the unequal lengths as key/value whole on every rank; a module the plan does not
        # declare as cross-attention may hold a shard of them instead, so say so rather than guess
        raise InvalidArgumentError(
            f"an attention call with {query.shape[-2]} queries and {key.shape[-2]} keys ran outside the modules "
            "the plan declares as cross-attention: name the module in CPPlan(cross_attention=...) if its keys are "
            "whole on every rank (text), or shard them with its queries")
    return attention_dispatch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                              kv_replicated=site == "replicated")


def cpattn_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None,
                   dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False, return_lse: bool = False, _parallel_config=None) -> torch.Tensor:
    """The backend function `use_cpattn` registers: diffusers' (B, S, H, D) q, k, v in, (B, S, H, D) out."""
    if return_lse:
        raise InvalidArgumentError("return_lse=True is not supported through cpattn: diffusers asks for it only "
                                   "in its own context-parallel attention; use cpattn.integrations.diffusers."
                                   "parallelize instead of enable_parallelism")
    if _parallel_config is not None:
        raise InvalidArgumentError(
            "this model has diffusers' own context parallelism on (enable_parallelism): its processors would "
            "shard twice; build the model without enable_parallelism and call "
            "cpattn.integrations.diffusers.parallelize(model, mesh) instead")
    if isinstance(attn_mask, torch.Tensor) and attn_mask.dim() == 2 and \
            tuple(attn_mask.shape) == (query.shape[0], key.shape[1]):
        attn_mask = attn_mask[:, None, None, :]  # a key mask (B, S_kv), as diffusers' native backend reads it
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    return _attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa).transpose(1, 2)


def cpattn_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None, dropout_p: float = 0.0,
                is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention inside `use_cpattn`, for processors that call it themselves."""
    return _attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


_ROUTE_LOCK = threading.Lock()
_route_depth = 0
_saved: dict[str, Any] = {}


def _route_on() -> None:
    global _route_depth
    with _ROUTE_LOCK:
        if _route_depth == 0:
            registry = _AttentionBackendRegistry
            members = list(registry._backends)
            _saved.update(sdpa=F.scaled_dot_product_attention, backends=dict(registry._backends),
                          constraints=dict(registry._constraints), names=dict(registry._supported_arg_names))
            names = set(inspect.signature(cpattn_backend).parameters)
            for member in members:
                registry._backends[member] = cpattn_backend
                registry._constraints[member] = []  # cpattn checks every call itself, for every provider
                registry._supported_arg_names[member] = names
            F.scaled_dot_product_attention = cpattn_sdpa
        _route_depth += 1


def _route_off() -> None:
    global _route_depth
    with _ROUTE_LOCK:
        _route_depth -= 1
        if _route_depth == 0:
            registry = _AttentionBackendRegistry
            registry._backends.update(_saved["backends"])
            registry._constraints.update(_saved["constraints"])
            registry._supported_arg_names.update(_saved["names"])
            F.scaled_dot_product_attention = _saved["sdpa"]
            _saved.clear()


@contextlib.contextmanager
def use_cpattn() -> Iterator[None]:
    """Route the attention of every diffusers model to cpattn for the block (see the module's docstring).

    Nests; the outermost block restores diffusers' registry and F.scaled_dot_product_attention on exit. The
    provider is the active one: open ``cpattn.attention_provider(...)`` inside or around it."""
    _route_on()
    try:
        yield
    finally:
        _route_off()


def is_routed() -> bool:
    """Whether a `use_cpattn` block is open (in any thread: the registry is one for the process)."""
    return _route_depth > 0


# -- plans ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CPPlan:
    """Where `parallelize` shards and gathers a model.

    ``modules``: diffusers' ``_cp_plan`` format, {submodule path ("" is the model, "blocks.*" every block): {input
    name: ContextParallelInput, or output index: ContextParallelInput(split_output=True)} or
    ContextParallelOutput(s)}. ``prefix``: the model's input (B, T, ...) whose T tokens every rank holds whole in
    front of its shard in joint attention (``cp_replicated_prefix``); ``suffix``: likewise behind its shard
    (``cp_replicated_suffix``: SD3 puts its text after the image). ``cross_attention``: paths of the modules
    whose keys and values every rank holds whole (``kv_replicated``); None: the modules with
    ``is_cross_attention`` set."""

    modules: Mapping[str, Any]
    prefix: str | None = None
    cross_attention: tuple[str, ...] | None = None
    suffix: str | None = None

    @classmethod
    def from_cp_plan(cls, cp_plan: Mapping[str, Any], *, replicate: Mapping[str, tuple] | None = None,
                     prefix: str | None = None, cross_attention: tuple[str, ...] | None = None,
                     suffix: str | None = None) -> "CPPlan":
        """A diffusers ``_cp_plan`` with the inputs in ``replicate`` ({path: names}) kept whole."""
        replicate = replicate or {}
        modules = {}
        for path, spec in cp_plan.items():
            if isinstance(spec, Mapping):
                spec = {name: s for name, s in spec.items() if name not in replicate.get(path, ())}
                if not spec:
                    continue
            modules[path] = spec
        return cls(modules, prefix, cross_attention, suffix)


UNSERVABLE_REASON = ("its convolutions and GroupNorm span the edges of any sequence shard, so attention-only "
                     "context parallelism cannot compute it (that needs patch parallelism with halo exchange of "
                     "activations, as in DistriFusion)")
_UNSERVABLE_NAMES = frozenset({"ControlNetModel", "SparseControlNetModel", "ControlNetXSAdapter", "VQModel"})


def _unservable(model) -> bool:
    name = type(model).__name__
    return "UNet" in name or name.startswith("Autoencoder") or name in _UNSERVABLE_NAMES


class UnservableModelError(UnsupportedInputError):
    """`parallelize` was given a model that attention-only context parallelism cannot compute (a UNet)."""


def _flux_plan(model) -> CPPlan:
    # diffusers splits Flux's text with the image; cpattn keeps it whole on every rank, in front of each image
    # shard, and counts its keys once (cp_replicated_prefix)
    return CPPlan.from_cp_plan(model._cp_plan, replicate={"": ("encoder_hidden_states", "txt_ids")},
                               prefix="encoder_hidden_states")


def _pixart_plan(model) -> CPPlan:
    # PixArt has no _cp_plan: shard after patchify and its 2-D position embedding (the blocks' input), gather
    # before unpatchify (proj_out's output)
    return CPPlan({"transformer_blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
                   "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)})


def _sd3_plan(model) -> CPPlan:
    # SD3 has no _cp_plan: shard after patchify and its position embedding (the blocks' input), gather before
    # unpatchify (proj_out's output). Its joint attention puts the text after the image: a replicated suffix
    dual = tuple(model.config.get("dual_attention_layers") or ())
    if dual:
        # those blocks' second attention is over the image alone, where the text suffix of the forward's
        # context-parallel block would be read from the image's last tokens
        raise UnsupportedInputError(f"parallelize({type(model).__name__})", [
            f"dual_attention_layers={dual} (SD3.5's image-only second attention) is not supported under "
            "parallelize: only the joint attention holds the replicated text"],
            "run this model on one device with its attention on cpattn (use_cpattn())")
    return CPPlan({"transformer_blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
                   "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)},
                  suffix="encoder_hidden_states")


# Models whose plan differs from their _cp_plan (or that have none), by class name; the others use _cp_plan.
RECIPES: dict[str, Callable[[Any], CPPlan]] = {
    "FluxTransformer2DModel": _flux_plan,
    "PixArtTransformer2DModel": _pixart_plan,
    "SD3Transformer2DModel": _sd3_plan,
}


def plan_for(model, plan: "CPPlan | Mapping | None" = None) -> CPPlan:
    """The plan `parallelize` applies to `model`: `plan` if given (a CPPlan or a ``_cp_plan``-style mapping), else
    the integration's recipe for the model's class, else its ``_cp_plan``."""
    name = type(model).__name__
    if _unservable(model):
        raise UnservableModelError(f"parallelize({name})", [f"{name}: {UNSERVABLE_REASON}"],
                                   "run it on one device with its attention on cpattn (use_cpattn()), or "
                                   "parallelize a transformer (DiT) model")
    if isinstance(plan, CPPlan):
        return plan
    if plan is not None:
        return CPPlan(dict(plan))
    if name in RECIPES:
        return RECIPES[name](model)
    cp_plan = getattr(model, "_cp_plan", None)
    if not cp_plan:
        raise InvalidArgumentError(
            f"{name} has no _cp_plan: pass plan= (a CPPlan, or a dict in _cp_plan's format) saying where to shard "
            "its sequence (after patchify and position embeddings) and where to gather it (before unpatchify)")
    return CPPlan(dict(cp_plan))


# -- parallelize ------------------------------------------------------------------------------------------------


def _find(model, path: str) -> list:
    """The submodules `path` names ("" the model; "*" every item of a ModuleList), as diffusers' plans name them."""
    found = [model]
    for atom in (path.split(".") if path else []):
        nxt = []
        for module in found:
            if atom == "*":
                if not isinstance(module, torch.nn.ModuleList):
                    raise InvalidArgumentError(f"plan path {path!r}: '*' stands for the items of a ModuleList, "
                                               f"not a {type(module).__name__}")
                nxt.extend(module)
            elif hasattr(module, atom) and isinstance(getattr(module, atom), torch.nn.Module):
                nxt.append(getattr(module, atom))
            else:
                raise InvalidArgumentError(f"plan path {path!r}: {type(module).__name__} has no submodule {atom!r}")
        found = nxt
    return found


def _acts_on_outputs(spec) -> bool:
    """A plan entry that gathers outputs, or splits some (an output index with split_output)."""
    if isinstance(spec, Mapping):
        return any(isinstance(k, int) for k in spec)
    return bool(spec)


def _names_in(spec) -> set:
    return set(spec) if isinstance(spec, Mapping) else set()


@dataclass(eq=False)
class _Parallel:
    """What `parallelize` installed on one model, and the per-forward switch its hooks read."""

    model: Any
    mesh: Any
    plan: CPPlan
    provider: str
    options: dict
    world: int
    original_forward: Any = None
    forward_params: list = field(default_factory=list)
    had_forward: bool = False
    handles: list = field(default_factory=list)
    active: bool = False

    @property
    def layout(self) -> str:
        return self.options.get("cp_layout", "zigzag")

    def __deepcopy__(self, memo):
        # the copy's forward would still be this model's (the wrapper closes over this state)
        raise InvalidArgumentError(f"a parallelized {type(self.model).__name__} cannot be copied: copy it before "
                                   "parallelize, or unparallelize(model) first")

    # -- tensors -------------------------------------------------------------------------------------------
    def split(self, x, spec):
        if isinstance(spec, (list, tuple)) and isinstance(x, (list, tuple)):
            if len(spec) != len(x):
                raise InvalidArgumentError(f"the plan names {len(spec)} parts of an input with {len(x)} parts")
            return type(x)(self.split(a, s) for a, s in zip(x, spec))
        if not isinstance(x, torch.Tensor) or spec is None:
            return x
        if spec.expected_dims is not None and x.dim() != spec.expected_dims:
            return x  # diffusers' rule: a plan entry applies to its rank only (Wan's 1-D timestep stays whole)
        return shard_sequence(x, self.mesh, spec.split_dim, self.layout)

    def gather(self, x, spec):
        if not isinstance(x, torch.Tensor) or spec is None:
            return x
        return _GatherSequence.apply(x, self.mesh, spec.gather_dim, self.layout,
                                     float(self.options.get("cp_timeout", 60.0)))

    # -- calls ---------------------------------------------------------------------------------------------
    def split_inputs(self, params: list[str], spec: Mapping, args: tuple, kwargs: dict):
        args = list(args)
        for name, entry in spec.items():
            if isinstance(name, int) or getattr(entry, "split_output", False):
                continue  # an output index: split after the call
            if name in kwargs:
                kwargs[name] = self.split(kwargs[name], entry)
            elif name in params and params.index(name) < len(args):
                i = params.index(name)
                args[i] = self.split(args[i], entry)
        return tuple(args), kwargs

    def finish_outputs(self, spec, output):
        single = isinstance(output, torch.Tensor)
        items = [output] if single else output
        if not isinstance(items, (list, tuple)):
            raise InvalidArgumentError(f"the plan splits or gathers outputs of a module returning "
                                       f"{type(output).__name__}; it takes tensors or tuples of tensors")
        items = list(items)
        if isinstance(spec, Mapping):
            for index, entry in spec.items():
                if isinstance(index, int) and getattr(entry, "split_output", False):
                    items[index] = self.split(items[index], entry)
        else:
            outs = [spec] if isinstance(spec, ContextParallelOutput) else list(spec)
            if len(outs) != len(items):
                raise InvalidArgumentError(f"the plan gathers {len(outs)} outputs of a module returning {len(items)}")
            items = [self.gather(x, s) for x, s in zip(items, outs)]
        return items[0] if single else type(output)(items)

    # -- hooks ---------------------------------------------------------------------------------------------
    def install(self) -> None:
        # every path resolved and checked before the first hook, so that a refused plan leaves the model as it was
        planned = [(module, spec) for path, spec in self.plan.modules.items() if path != ""  # "": in forward()
                   for module in _find(self.model, path)]
        crossing = self._cross_attention_modules()
        for module, spec in planned:
            self._hook_module(module, spec)
        for _, module in crossing:
            self._hook_cross_attention(module)
        self.original_forward = self.model.forward
        self.forward_params = list(inspect.signature(self.original_forward).parameters)
        self.had_forward = "forward" in vars(self.model)
        self.model.forward = _wraps(self.original_forward, self.forward)

    def _hook_module(self, module, spec) -> None:
        params = list(inspect.signature(module.forward).parameters)
        if isinstance(spec, Mapping) and any(not isinstance(k, int) for k in spec):
            def pre(mod, args, kwargs):
                return self.split_inputs(params, spec, args, kwargs) if self.active else None
            self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        if _acts_on_outputs(spec):
            def post(mod, args, output):
                return self.finish_outputs(spec, output) if self.active else None
            self.handles.append(module.register_forward_hook(post))

    def _cross_attention_modules(self) -> list:
        paths = self.plan.cross_attention
        if paths is None:
            found = [(n, m) for n, m in self.model.named_modules() if getattr(m, "is_cross_attention", False) is True]
        else:
            names = {id(m): n for n, m in self.model.named_modules()}
            found = [(names.get(id(m), p), m) for p in paths for m in _find(self.model, p)]
        split = set().union(*(_names_in(s) for s in self.plan.modules.values())) if self.plan.modules else set()
        if found and "encoder_hidden_states" in split:
            raise InvalidArgumentError(
                f"the plan splits encoder_hidden_states, which cross-attention ({found[0][0]}) reads: cpattn's "
                "cross-attention takes its keys whole on every rank; drop that split from the plan")
        return found

    def _hook_cross_attention(self, module) -> None:
        params = list(inspect.signature(module.forward).parameters)
        tokens: list = []

        def pre(mod, args, kwargs):
            if not self.active:
                return None
            # without encoder states such a module attends to its own (sharded) tokens
            encoder = _argument(params, args, kwargs, "encoder_hidden_states",
                                missing=None if "encoder_hidden_states" in params else True)
            tokens.append(_SITE.set("replicated" if encoder is not None else "sharded"))
            return None

        def post(mod, args, output):
            if tokens:
                _SITE.reset(tokens.pop())
            return None
        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(module.register_forward_hook(post, always_call=True))

    def uninstall(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.had_forward:
            self.model.forward = self.original_forward
        else:
            del self.model.forward

    # -- the model's forward -------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        model = self.model
        if self.world > 1 and torch.is_grad_enabled() and getattr(model, "gradient_checkpointing", False):
            raise UnsupportedInputError(f"parallelize({type(model).__name__})", [
                "gradient checkpointing recomputes blocks in the backward, outside the forward's context-parallel "
                "block, where their attention would see this rank's shard alone"],
                "model.disable_gradient_checkpointing() for training under parallelize")
        root = self.plan.modules.get("", {})
        params = self.forward_params
        if isinstance(root, Mapping):
            args, kwargs = self.split_inputs(params, root, args, kwargs)
        options = dict(self.options)
        for option, name in (("cp_replicated_prefix", self.plan.prefix), ("cp_replicated_suffix", self.plan.suffix)):
            tokens = self._replicated_length(params, args, kwargs, name)
            if tokens:
                options[option] = tokens
        with contextlib.ExitStack() as stack:
            stack.enter_context(use_cpattn())
            stack.enter_context(attention_provider(self.provider, cp_mesh=self.mesh, **options))
            token = _SITE.set("sharded") if self.world > 1 else None
            self.active = True
            _count_forward(+1)
            try:
                output = self.original_forward(*args, **kwargs)
            finally:
                _count_forward(-1)
                self.active = False
                if token is not None:
                    _SITE.reset(token)
        return self.finish_outputs(root, output) if _acts_on_outputs(root) else output

    @staticmethod
    def _replicated_length(params, args, kwargs, name: str | None) -> int:
        """The tokens of the model's input `name` (the plan's prefix or suffix), which every rank holds whole."""
        x = _argument(params, args, kwargs, name) if name else None
        return int(x.shape[1]) if isinstance(x, torch.Tensor) else 0


def _argument(params: list[str], args: tuple, kwargs: dict, name: str, missing=None):
    """The value a call passes for parameter `name` (by keyword or by position), else `missing`."""
    if name in kwargs:
        return kwargs[name]
    return args[params.index(name)] if name in params and params.index(name) < len(args) else missing


def _wraps(original, forward):
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)
    wrapper.__wrapped__ = original  # inspect.signature (pipelines read the model's parameters) sees the model's
    wrapper.__doc__ = getattr(original, "__doc__", None)
    return wrapper


class _GatherSequence(torch.autograd.Function):
    """The whole sequence on every rank; backward keeps this rank's rows of the (same on every rank) gradient."""

    @staticmethod
    def forward(ctx, x, mesh, dim, layout, timeout):
        ctx.mesh, ctx.dim, ctx.layout = mesh, dim, layout
        return gather_sequence(x.contiguous(), mesh, dim, layout, timeout)

    @staticmethod
    def backward(ctx, grad):
        return shard_sequence(grad, ctx.mesh, ctx.dim, ctx.layout), None, None, None, None


_ATTR = "_cpattn_parallel"
_FIXED_OPTIONS = ("cp_replicated_prefix", "cp_replicated_suffix")


def parallelize(model, mesh, plan: "CPPlan | Mapping | None" = None, provider: str = "auto", **cp_options):
    """Make `model`'s forward context-parallel over `mesh`, in place; returns the model.

    `mesh`: what ``attention_provider``'s ``cp_mesh`` takes (a 1-D DeviceMesh or ProcessGroup, or a 2-D ("ring",
    "ulysses") DeviceMesh). `plan`: see `plan_for`. `provider`: the cpattn provider of every attention call.
    `cp_options`: ``attention_provider``'s cp_* options (cp_strategy, cp_layout, cp_timeout, ...); the replicated
    prefix comes from the plan. The model then takes and returns whole tensors, the same on every rank; its
    parameters' gradients are each rank's share (all-reduce them with SUM over the mesh).
    Raises `UnservableModelError` for a UNet, InvalidArgumentError for a model with no plan."""
    name = type(model).__name__
    resolved = plan_for(model, plan)
    if is_parallelized(model):
        raise InvalidArgumentError(f"{name} is parallelized already: unparallelize(model) first")
    if getattr(model, "_parallel_config", None) is not None:
        raise InvalidArgumentError(f"{name} has diffusers' own context parallelism on (enable_parallelism): "
                                   "build it without, then parallelize it with cpattn")
    for key in cp_options:
        if key not in CP_OPTIONS or key in _FIXED_OPTIONS:
            known = ", ".join(k for k in CP_OPTIONS if k not in _FIXED_OPTIONS)
            raise InvalidArgumentError(f"parallelize takes the options {known}; got {key!r}"
                                       + (" (it comes from the plan's prefix or suffix)" if key in _FIXED_OPTIONS
                                          else ""))
    with attention_provider(provider, cp_mesh=mesh, **dict(cp_options, cp_require_attention=False)) as checked:
        world = checked.cp.world_size  # the provider, the options and the mesh checked now, not at the first call
    state = _Parallel(model, mesh, resolved, provider, dict(cp_options), world)
    state.install()
    object.__setattr__(model, _ATTR, state)  # not a submodule, not a buffer: nn.Module's setattr would not mind
    return model


def unparallelize(model):
    """Remove what `parallelize` installed; the model runs on one device again. Returns the model."""
    state = vars(model).pop(_ATTR, None)
    if state is not None:
        state.uninstall()
    return model


def is_parallelized(model) -> bool:
    return _ATTR in vars(model)


def check_parity(model, inputs, mesh, plan: "CPPlan | Mapping | None" = None, provider: str = "auto",
                 **kwargs) -> "parity.ParityReport":
    """Outputs and summed gradients of `model` under `parallelize` against the same model on one process, over a
    few steps (see ``cpattn.integrations.parity.check_parity`` for `inputs`, steps, tolerances and the report).

    Call it on every rank of `mesh` with the model before `parallelize` (it works on copies); `kwargs` other than
    check_parity's go to `parallelize` (cp_strategy, ...)."""
    names = set(inspect.signature(parity.check_parity).parameters) - {"model", "inputs", "mesh", "parallelize"}
    cp_options = {k: kwargs.pop(k) for k in list(kwargs) if k not in names}
    return parity.check_parity(model, inputs, mesh,
                               lambda m, mesh_: parallelize(m, mesh_, plan, provider, **cp_options), **kwargs)
