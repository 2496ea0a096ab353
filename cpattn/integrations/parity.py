"""Does a context-parallel model compute what the same model computes on one process? Outputs and summed gradients.

    report = check_parity(model, inputs, mesh, parallelize=my_parallelize)   # on every rank of the mesh
    print(report)   # "parity over 2 steps: output max |diff| 1.7e-07 relative to max(1, |output|) (tol 1e-05), ..."

`check_parity` works on two copies of `model`: one runs whole on every rank with its own attention (the
reference), the other is made context-parallel by `parallelize(copy, mesh)`, and must take and return whole
tensors (as `cpattn.integrations.diffusers.parallelize` arranges). Each step runs both forward on the same inputs
and backward from the same random output gradient (a fixed seed, the same on every rank), all-reduces the
parallel copy's gradients with SUM over the mesh, compares, then takes one SGD step on each copy with its own
gradients, so that later steps run at weights the parallel copy produced. Weights and inputs are broadcast from
the mesh's first rank first, so ranks that built them differently still compare like for like.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from ..cp.mesh import topology_from_mesh
from .training import all_reduce_grads

__all__ = ["GRAD_FLOOR", "ParityError", "ParityReport", "StepParity", "check_parity", "default_tolerances"]

# (output, gradient) tolerances by the output's dtype: the output's relative to max(1, its largest magnitude), each
# parameter gradient's relative to the larger of its largest magnitude and GRAD_FLOOR times the largest of all:
# gradients that are zero in exact arithmetic (a key projection's bias: softmax ignores a shift of every score of a
# row) carry only rounding, which a ratio to their own magnitude would make look like a difference
GRAD_FLOOR = 1e-2
_TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (5e-3, 2e-2),
    torch.bfloat16: (3e-2, 1e-1),
}


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    return _TOLERANCES.get(dtype, _TOLERANCES[torch.float32])


@dataclass(frozen=True)
class StepParity:
    step: int
    out_err: float  # max |parallel - reference| of the output
    out_scale: float  # max |reference| of the output
    grad_err: float  # max over parameters of max |parallel - reference| of its gradient, relative (see GRAD_FLOOR)
    worst_param: str | None  # the parameter of grad_err
    one_sided: tuple[str, ...]  # parameters with a gradient on one side only


@dataclass(frozen=True)
class ParityReport:
    steps: tuple[StepParity, ...]
    out_tol: float
    grad_tol: float

    @property
    def max_out_err(self) -> float:
        return max(s.out_err / max(1.0, s.out_scale) for s in self.steps)

    @property
    def max_grad_err(self) -> float:
        return max(s.grad_err for s in self.steps)

    @property
    def ok(self) -> bool:
        return (self.max_out_err <= self.out_tol and self.max_grad_err <= self.grad_tol
                and not any(s.one_sided for s in self.steps))

    def __str__(self) -> str:
        worst = max(self.steps, key=lambda s: s.grad_err)
        text = (f"parity over {len(self.steps)} steps: output max |diff| {self.max_out_err:.3g} relative to "
                f"max(1, |output|) (tol {self.out_tol:g}), gradients max relative diff {self.max_grad_err:.3g} "
                f"({worst.worst_param}, step {worst.step}) (tol {self.grad_tol:g})")
        one_sided = sorted({n for s in self.steps for n in s.one_sided})
        if one_sided:
            text += f"; gradient on one side only: {', '.join(one_sided[:5])}"
        return text + (": ok" if self.ok else ": FAILED")


class ParityError(AssertionError):
    """The parallel model's outputs or gradients differ from one process's beyond the tolerances."""

    def __init__(self, report: ParityReport):
        self.report = report
        super().__init__(str(report))


def check_parity(model: torch.nn.Module, inputs: "Mapping | Sequence[Mapping]", mesh,
                 parallelize: Callable[[torch.nn.Module, Any], torch.nn.Module], *, steps: int = 2,
                 lr: float = 1e-3, out_tol: float | None = None, grad_tol: float | None = None,
                 output: Callable[[Any], torch.Tensor] | None = None, seed: int = 0,
                 raise_on_failure: bool = True) -> ParityReport:
    """Run `steps` steps of `model` under `parallelize` and on one process; return (or raise, as ParityError)
    the report of their largest differences. Call it on every rank of `mesh`, with the same arguments.

    `inputs`: the model's keyword arguments, whole (the same every step), or one mapping per step (then `steps`
    is their number). `output`: picks the tensor compared from what the model returns (default: the tensor, the
    first item of a tuple, or the first field of a diffusers output). Tolerances default by the output's dtype
    (`default_tolerances`). `lr`: the SGD step between steps (0 keeps the weights)."""
    per_step = [inputs] * steps if isinstance(inputs, Mapping) else list(inputs)
    groups = _groups(mesh)
    reference = copy.deepcopy(model)
    _broadcast_module(reference, groups)
    parallel = parallelize(copy.deepcopy(reference), mesh)
    pick = output or _first_tensor
    results = []
    for step, step_inputs in enumerate(per_step):
        step_inputs = _broadcast_tree(step_inputs, groups)
        out_ref = _run(reference, step_inputs, pick, seed + step)
        out_cp = _run(parallel, step_inputs, pick, seed + step)
        all_reduce_grads(parallel, mesh)  # every rank's share: the gradients of one process
        grads_ref, grads_cp = _grads(reference), _grads(parallel)
        results.append(_compare(step, out_ref, out_cp, grads_ref, grads_cp))
        if lr:
            _sgd(reference, grads_ref, lr)
            _sgd(parallel, grads_cp, lr)
    default_out, default_grad = default_tolerances(out_ref.dtype)
    report = ParityReport(tuple(results), out_tol if out_tol is not None else default_out,
                          grad_tol if grad_tol is not None else default_grad)
    if raise_on_failure and not report.ok:
        raise ParityError(report)
    return report


def _run(model, inputs, pick, seed) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = pick(model(**inputs))
    gen = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out.device, out.dtype)
    out.backward(dout)
    return out.detach()


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(step, out_ref, out_cp, grads_ref, grads_cp) -> StepParity:
    out_err = (out_cp.double() - out_ref.double()).abs().max().item() if out_cp.shape == out_ref.shape \
        else float("inf")
    worst, grad_err = None, 0.0
    common = grads_ref.keys() & grads_cp.keys()
    floor = GRAD_FLOOR * max((grads_ref[n].abs().max().item() for n in common), default=0.0)
    for name in common:
        ref = grads_ref[name].double()
        err = ((grads_cp[name].double() - ref).abs().max() / max(ref.abs().max().item(), floor, 1e-30)).item()
        if err > grad_err or worst is None:
            worst, grad_err = name, err
    # all_reduce_grads gives every parameter a gradient (zeros where no rank used it): only a nonzero one counts
    one_sided = tuple(sorted(n for n in grads_ref.keys() ^ grads_cp.keys()
                             if bool((grads_ref.get(n, grads_cp.get(n)) != 0).any())))
    return StepParity(step, out_err, out_ref.abs().max().item(), grad_err, worst, one_sided)


@torch.no_grad()
def _sgd(model, grads, lr) -> None:
    for name, p in model.named_parameters():
        if name in grads:
            p.sub_(grads[name].to(p.dtype), alpha=lr)


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):  # diffusers' and transformers' output classes
        out = out.to_tuple()
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot pick the output tensor from a {type(out).__name__}: pass output=")


# -- broadcasts over the whole mesh -----------------------------------------------------------------------------


def _groups(mesh) -> list:
    """The mesh's groups (ring across, Ulysses inside): a broadcast over each in turn covers every rank."""
    t = topology_from_mesh(mesh)
    return [g for g in (t.ring, t.ulysses) if g is not None]


def _broadcast(t: torch.Tensor, groups) -> None:
    for group in groups:  # ring first, from its rank 0, then inside each Ulysses group from its rank 0
        _on_backend(t, group, lambda x: dist.broadcast(x, src=group.global_rank(0), group=group.pg))


def _on_backend(t: torch.Tensor, group, collective) -> None:
    """Run `collective` in place on `t`, through a CUDA copy where the group is NCCL's and `t` is not on a GPU."""
    if group.backend == "nccl" and not t.is_cuda:
        staged = t.cuda()
        collective(staged)
        t.copy_(staged)
    else:
        collective(t)


@torch.no_grad()
def _broadcast_module(module: torch.nn.Module, groups) -> None:
    for t in list(module.parameters()) + list(module.buffers()):
        _broadcast(t.data, groups)


def _broadcast_tree(tree, groups):
    if isinstance(tree, torch.Tensor):
        out = tree.detach().clone()
        _broadcast(out, groups)
        return out
    if isinstance(tree, Mapping):
        return {k: _broadcast_tree(v, groups) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_broadcast_tree(v, groups) for v in tree)
    return tree
