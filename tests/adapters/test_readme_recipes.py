"""The README's integration recipes, run as written against the same models on one process.

Each recipe is the ```python block after a ``<!-- recipe: NAME -->`` marker in README.md. It runs with the names
the README says it takes (`path`: a checkpoint, saved here from a tiny random config; `input_ids`; `inputs`:
a transformer's keyword inputs; `model`, `mesh` for the plan recipe), on CPU: the one substitution is the
recipes' ``device = "cuda"`` line, which becomes ``device = "cpu"`` (init_device_mesh then takes gloo). The
one-device recipe runs in this process; the context-parallel ones in one spawned job of 2 gloo ranks, whose
results are compared with the same model run whole on one process: the loss and summed gradients of the
training step, the output of the parallelized transformer.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (the dev extra pins it)")
pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[dev]')")

import hf_models  # noqa: E402
from paths import REPO  # noqa: E402
from reliability_helpers import run_ranks  # noqa: E402

RECIPES = ("transformers-one-device", "transformers-train", "diffusers-parallelize", "diffusers-plan")
_ON_GPU, _ON_CPU = 'device = "cuda"', 'device = "cpu"'
WORLD = 2
TOL = 1e-5  # float32 against the model's own float32 attention


def readme_recipes() -> dict[str, str]:
    """{name: code} of every marked python block of README.md."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    found = re.findall(r"<!-- recipe: ([\w-]+) -->\s*```python\n(.*?)```", text, flags=re.S)
    return dict(found)


def on_cpu(code: str) -> str:
    """The recipe with its device line on CPU; a recipe that names CUDA anywhere else would not run here."""
    code = code.replace(_ON_GPU, _ON_CPU)
    assert '"cuda"' not in code and ".cuda()" not in code, code
    return code


def run_recipe(name: str, **names) -> dict:
    """Execute recipe `name` with `names` bound; its namespace afterwards, and what it printed as "_stdout"."""
    namespace = dict(names)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(on_cpu(readme_recipes()[name]), f"README.md:{name}", "exec"), namespace)
    namespace["_stdout"] = printed.getvalue()
    return namespace


def test_every_recipe_is_marked():
    recipes = readme_recipes()
    assert set(RECIPES) <= set(recipes), sorted(recipes)
    for name in ("transformers-one-device", "transformers-train", "diffusers-parallelize"):
        assert recipes[name].count(_ON_GPU) == 1, name  # the line the tests substitute


def _save_llama(directory: str) -> str:
    hf_models.build("llama", "sdpa").save_pretrained(directory)
    return directory


def _input_ids() -> torch.Tensor:
    return hf_models.batch("llama")["input_ids"]


def test_transformers_one_device_recipe(tmp_path):
    from transformers import AutoModelForCausalLM

    path = _save_llama(str(tmp_path / "llama"))
    ns = run_recipe("transformers-one-device", path=path, input_ids=_input_ids())
    assert ns["model"].config._attn_implementation == "cpattn"
    reference = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    expected = reference.generate(_input_ids(), max_new_tokens=8, do_sample=False)
    assert torch.equal(ns["tokens"], expected)


# -- the context-parallel recipes, on 2 ranks -------------------------------------------------------------------


def _flux_inputs() -> dict:
    from test_diffusers_models import build

    _, inputs = build("flux")
    return {k: v for k, v in inputs.items() if k != "return_dict"}


def _counting_cp_runs() -> dict:
    """Count cpattn's context-parallel runs in this process (so a recipe that never shards is caught)."""
    import cpattn.cp.context as context

    counts, run = {"cp_runs": 0}, context.ContextParallel.run

    def counting(self, *args, **kwargs):
        counts["cp_runs"] += 1
        return run(self, *args, **kwargs)
    context.ContextParallel.run = counting
    return counts


def _train_step(llama: str) -> dict:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    ns = run_recipe("transformers-train", path=llama, input_ids=_input_ids())
    loss = ns["loss"].detach().clone()
    dist.all_reduce(loss)
    reference = AutoModelForCausalLM.from_pretrained(llama, attn_implementation="sdpa")
    ref_loss = reference(input_ids=_input_ids(), labels=_input_ids()).loss
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    return {
        "loss_err": abs(loss.item() - ref_loss.item()),
        "grad_err": max(((p.grad - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-12)).item()
                        for n, p in ns["model"].named_parameters()),
    }


def _parallelized_flux(flux: str) -> dict:
    from diffusers import FluxTransformer2DModel

    inputs = _flux_inputs()
    ns = run_recipe("diffusers-parallelize", path=flux, inputs=inputs)
    reference = FluxTransformer2DModel.from_pretrained(flux, subfolder="transformer")
    expected = reference(**inputs).sample
    return {"printed": ns["_stdout"].strip(),
            "out_err": (ns["sample"] - expected).abs().max().item() / max(1.0, expected.abs().max().item())}


def _planned_pixart() -> dict:
    from test_diffusers_models import build
    from torch.distributed.device_mesh import init_device_mesh

    from cpattn.integrations.diffusers import is_parallelized

    model, inputs = build("pixart")
    reference = copy.deepcopy(model)
    run_recipe("diffusers-plan", model=model, inputs=inputs, mesh=init_device_mesh("cpu", (WORLD,)))
    expected = reference(**inputs)[0]
    return {"parallelized": is_parallelized(model),
            "out_err": (model(**inputs)[0] - expected).abs().max().item() / max(1.0, expected.abs().max().item())}


def _recipes_job(rank: int, world: int, paths: dict) -> dict:
    os.environ["WORLD_SIZE"] = str(world)  # what torchrun sets; the recipes read it
    counts = _counting_cp_runs()
    out = {}
    for name, case in (("train", lambda: _train_step(paths["llama"])),
                       ("flux", lambda: _parallelized_flux(paths["flux"])),
                       ("plan", _planned_pixart)):
        counts["cp_runs"] = 0
        try:
            out[name] = case()
        except Exception as exc:  # every rank raises alike (cpattn's agreement check): the next recipe still runs
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        out[name]["cp_runs"] = counts["cp_runs"]
    return out


@pytest.fixture(scope="module")
def cp_results(tmp_path_factory):
    from test_diffusers_models import build

    root = tmp_path_factory.mktemp("recipes")
    flux, _ = build("flux")
    flux.save_pretrained(str(root / "flux" / "transformer"))
    paths = {"llama": _save_llama(str(root / "llama")), "flux": str(root / "flux")}
    result = run_ranks(WORLD, _recipes_job, paths, timeout=240)
    for r in result.ranks:
        assert r.error is None and not r.killed, (r.rank, r.error, r.killed)
    return result[0].value


@pytest.mark.distributed
def test_transformers_training_recipe_matches_one_process(cp_results):
    r = cp_results["train"]
    assert "error" not in r, r["error"]
    assert r["cp_runs"] > 0, "the model's attention must run context-parallel"
    assert r["loss_err"] <= TOL, r
    assert r["grad_err"] <= 10 * TOL, r  # relative to each gradient's largest entry


@pytest.mark.distributed
def test_diffusers_parallelize_recipe_matches_one_process(cp_results):
    r = cp_results["flux"]
    assert "error" not in r, r["error"]
    assert r["cp_runs"] > 0, r
    assert r["printed"].startswith("parity over 2 steps") and r["printed"].endswith(": ok"), r["printed"]
    assert r["out_err"] <= TOL, r


@pytest.mark.distributed
def test_diffusers_plan_recipe_matches_one_process(cp_results):
    r = cp_results["plan"]
    assert "error" not in r, r["error"]
    assert r["parallelized"] and r["cp_runs"] > 0, r
    assert r["out_err"] <= TOL, r
