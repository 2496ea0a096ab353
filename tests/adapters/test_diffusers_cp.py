"""diffusers models under cpattn.integrations.diffusers.parallelize, against the same model on one process.

One spawned job of W gloo ranks per world size (1, 2, 3) runs every model: the reference is the model whole, on
one process, with diffusers' own attention; the parallel copy takes the same whole inputs and returns the whole
output through `parallelize`. Compared: the output, and the parameters' gradients summed over the ranks (the
backward runs after the forward returned, as a training step would run it). The W = 2 job also runs
`check_parity` (and its failure on plans that count Flux's or SD3's text W times), the refusal of a model whose
attention never reaches cpattn, and the refusals of gradient checkpointing and of plans that would break
cross-attention; the W = 1 job, parallelize's install and removal. The jobs also run test_diffusers.py's
hand-made Flux recipe (sdpa_patched).
"""

from __future__ import annotations

import copy

import pytest
import torch

from reliability_helpers import run_ranks
from test_diffusers_models import ATTENTION_CALLS, MODELS, build

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[dev]')")

WORLDS = (1, 2, 3)
CP_TIMEOUT = 30  # seconds any rank waits for a peer; a rank that raised alone makes the others raise, not hang
COUNTS = {"calls": 0, "cp_runs": 0}


def _count_calls() -> None:
    """Count cpattn's attention calls (all) and its context-parallel runs in COUNTS, through the modules' globals
    (once per rank process)."""
    import cpattn.cp.context as context
    import cpattn.integrations.diffusers as integration

    dispatch, run = integration.attention_dispatch, context.ContextParallel.run

    def counting_dispatch(*args, **kwargs):
        COUNTS["calls"] += 1
        return dispatch(*args, **kwargs)

    def counting_run(self, *args, **kwargs):
        COUNTS["cp_runs"] += 1
        return run(self, *args, **kwargs)
    integration.attention_dispatch = counting_dispatch
    context.ContextParallel.run = counting_run


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _model_parity(name: str, mesh) -> dict:
    import torch.distributed as dist

    from cpattn.integrations.diffusers import parallelize

    model, inputs = build(name)
    reference = copy.deepcopy(model)
    out_ref = reference(**inputs)[0]
    dout = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(7))
    out_ref.backward(dout)
    grads_ref = _grads(reference)

    parallelize(model, mesh, provider="native", cp_timeout=CP_TIMEOUT)
    COUNTS.update(calls=0, cp_runs=0)
    out = model(**inputs)[0]
    forward_calls = dict(COUNTS)
    out.backward(dout)  # outside the forward's attention_provider block
    grads = _grads(model)
    for g in grads.values():
        dist.all_reduce(g)  # each rank holds its share of every parameter's gradient
    # relative to 1% of the largest gradient at least: gradients zero in exact arithmetic (a key projection's bias)
    # carry only rounding
    floor = 1e-2 * max(g.abs().max().item() for g in grads_ref.values())
    return {
        "out_err": (out.detach() - out_ref.detach()).abs().max().item(),
        "out_scale": out_ref.abs().max().item(),
        "same_params": sorted(grads) == sorted(grads_ref),
        "grad_rel_err": max(((grads[n] - g).abs().max() / g.abs().max().clamp_min(floor)).item()
                            for n, g in grads_ref.items() if n in grads),
        "calls": forward_calls["calls"],
        "cp_runs": forward_calls["cp_runs"],
    }


def _check_parity_cases(mesh) -> dict:
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    from cpattn.integrations.diffusers import CPPlan, check_parity, plan_for
    from cpattn.integrations.parity import ParityError

    import torch.distributed as dist

    model, inputs = build("flux")
    if dist.get_rank() == 1:  # weights and inputs unlike rank 0's: check_parity takes rank 0's everywhere
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        inputs = dict(inputs, hidden_states=inputs["hidden_states"] + 1.0)
    out = {"ok": str(check_parity(model, inputs, mesh, provider="native", steps=2, cp_timeout=CP_TIMEOUT))}
    # Flux's text whole on every rank but not declared as the replicated prefix: its keys count W times
    wrong = CPPlan({"": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
                         "img_ids": ContextParallelInput(split_dim=0, expected_dims=2)},
                    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)})
    try:
        check_parity(model, inputs, mesh, plan=wrong, provider="native", steps=1, cp_timeout=CP_TIMEOUT)
        out["wrong"] = "passed"
    except ParityError as exc:
        out["wrong"] = f"ParityError: {exc}"
    # SD3's text after its image shard, whole on every rank, but not declared as the replicated suffix
    sd3, sd3_inputs = build("sd3")
    no_suffix = CPPlan(dict(plan_for(sd3).modules))
    try:
        check_parity(sd3, sd3_inputs, mesh, plan=no_suffix, provider="native", steps=1, cp_timeout=CP_TIMEOUT)
        out["sd3_no_suffix"] = "passed"
    except ParityError as exc:
        out["sd3_no_suffix"] = f"ParityError: {exc}"
    return out


def _bypassing_attention(mesh) -> str:
    """A processor that computes attention itself (diffusers' AttnProcessor: baddbmm, no SDPA) never reaches
    cpattn: the forward must raise NoAttentionCallError rather than return each rank's shard-local result."""
    from diffusers.models.attention_processor import AttnProcessor

    import cpattn
    from cpattn.integrations.diffusers import parallelize

    model, inputs = build("pixart")
    model.set_attn_processor(AttnProcessor())
    parallelize(model, mesh, provider="native", cp_timeout=CP_TIMEOUT)
    try:
        model(**inputs)
    except cpattn.NoAttentionCallError as exc:
        return f"NoAttentionCallError: {exc}"
    return "no error"


def _checkpointing_refused(mesh) -> str:
    import cpattn
    from cpattn.integrations.diffusers import parallelize

    model, inputs = build("flux")
    model.enable_gradient_checkpointing()
    parallelize(model, mesh, provider="native", cp_timeout=CP_TIMEOUT)
    try:
        model(**inputs)
    except cpattn.UnsupportedInputError as exc:
        return f"UnsupportedInputError: {exc}"
    return "no error"


def _lifecycle(mesh) -> dict:
    """parallelize installs, refuses a second time and a copy; unparallelize leaves the model as it was."""
    import inspect

    import cpattn
    from cpattn.integrations.diffusers import is_parallelized, parallelize, unparallelize

    model, inputs = build("wan")
    before = model(**inputs)[0]
    signature = inspect.signature(model.forward)
    parallelize(model, mesh, provider="native")
    out = {"signature_kept": inspect.signature(model.forward) == signature}  # pipelines read the parameters
    for what, attempt in (("again", lambda: parallelize(model, mesh)), ("copy", lambda: copy.deepcopy(model))):
        try:
            attempt()
            out[what] = "no error"
        except cpattn.InvalidArgumentError as exc:
            out[what] = f"InvalidArgumentError: {exc}"
    unparallelize(model)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    out.update(restored=not is_parallelized(model) and "forward" not in vars(model) and hooks == 0,
               same=bool(torch.equal(model(**inputs)[0], before)))
    return out


def _refused_plans(mesh) -> dict:
    """Plans that would make cross-attention wrong are refused: text split though cross-attention reads it whole
    (at parallelize), and keys of another length in a module not declared cross-attention (at the call, W > 1)."""
    from diffusers.models._modeling_parallel import ContextParallelInput

    import cpattn
    from cpattn.integrations.diffusers import CPPlan, parallelize

    out = {}
    model, inputs = build("wan")
    text_split = dict(model._cp_plan, **{"blocks.0": {
        "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
        "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)}})
    undeclared = CPPlan(dict(model._cp_plan), cross_attention=())
    for what, plan, run in (("text_split", text_split, False), ("undeclared", undeclared, True)):
        try:
            parallelize(model, mesh, plan=plan, provider="native", cp_timeout=CP_TIMEOUT)
            if run:
                model(**inputs)
            out[what] = "no error"
        except cpattn.InvalidArgumentError as exc:
            out[what] = f"InvalidArgumentError: {exc}"
    return out


def _world_job(rank: int, world: int, payload) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    _count_calls()
    results = {}
    for name in MODELS:
        try:
            results[name] = _model_parity(name, mesh)
        except Exception as exc:  # every rank raises alike (cpattn's agreement check): the next model still runs
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    from test_diffusers import RECIPE_CASES, recipe_case  # the hand-made recipe of test_diffusers.py

    for strategy in RECIPE_CASES.get(world, ()):
        try:
            results[f"recipe-{strategy}"] = recipe_case(mesh, strategy)
        except Exception as exc:
            results[f"recipe-{strategy}"] = {"error": f"{type(exc).__name__}: {exc}"}
    if world == 1:
        results["lifecycle"] = _lifecycle(mesh)
    if world == 2:
        results["check_parity"] = _check_parity_cases(mesh)
        results["bypass"] = _bypassing_attention(mesh)
        results["checkpointing"] = _checkpointing_refused(mesh)
        results["refused_plans"] = _refused_plans(mesh)
    return results


_JOBS: dict = {}


def _job(world: int) -> dict:
    if world not in _JOBS:
        result = run_ranks(world, _world_job, None, timeout=240)
        for r in result.ranks:
            assert r.error is None and not r.killed, (r.rank, r.error, r.killed)
        _JOBS[world] = result[0].value
    return _JOBS[world]


@pytest.mark.distributed
@pytest.mark.parametrize("world,name", [pytest.param(w, n, id=f"{n}-W{w}") for w in WORLDS for n in MODELS])
def test_parallelized_model_matches_one_process(world, name):
    r = _job(world)[name]
    assert "error" not in r, r["error"]
    assert r["calls"] == ATTENTION_CALLS[name], f"every attention call must reach cpattn: {r}"
    assert r["cp_runs"] == (ATTENTION_CALLS[name] if world > 1 else 0), r
    assert r["out_err"] <= 1e-5 * max(1.0, r["out_scale"]), f"output differs from one process by {r['out_err']:.3g}"
    assert r["same_params"]
    assert r["grad_rel_err"] <= 1e-4, f"summed gradients differ (relative) by {r['grad_rel_err']:.3g}"


@pytest.mark.distributed
def test_parallelize_and_unparallelize():
    r = _job(1)["lifecycle"]
    assert r["signature_kept"] and r["restored"] and r["same"], r
    assert r["again"].startswith("InvalidArgumentError") and "parallelized already" in r["again"], r
    assert r["copy"].startswith("InvalidArgumentError") and "cannot be copied" in r["copy"], r


@pytest.mark.distributed
def test_check_parity_passes_and_catches_text_counted_twice():
    r = _job(2)["check_parity"]
    assert r["ok"].startswith("parity over 2 steps") and r["ok"].endswith(": ok"), r["ok"]
    assert r["wrong"].startswith("ParityError: parity over 1 steps") and "FAILED" in r["wrong"], r["wrong"]
    assert r["sd3_no_suffix"].startswith("ParityError") and "FAILED" in r["sd3_no_suffix"], r["sd3_no_suffix"]


@pytest.mark.distributed
def test_attention_outside_cpattn_raises():
    r = _job(2)["bypass"]
    assert r.startswith("NoAttentionCallError"), r


@pytest.mark.distributed
def test_gradient_checkpointing_is_refused():
    r = _job(2)["checkpointing"]
    assert r.startswith("UnsupportedInputError") and "gradient checkpointing" in r, r


@pytest.mark.distributed
def test_plans_that_would_break_cross_attention_are_refused():
    r = _job(2)["refused_plans"]
    assert r["text_split"].startswith("InvalidArgumentError") and "drop that split" in r["text_split"], r
    assert r["undeclared"].startswith("InvalidArgumentError") and "cross_attention=" in r["undeclared"], r
