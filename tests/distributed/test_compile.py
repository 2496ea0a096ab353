"""torch.compile with cpattn as the attention: single device without graph breaks, and context-parallel (2 ranks).

Single device: dispatch puts the custom op `cpattn::attention_fwd` (cpattn/compiled.py) in the graph, so
`fullgraph=True` works; the provider is read when the graph runs, not when it is traced. Under CP each attention
call is one graph break (the schedule runs eagerly); tests/support/compile_cp_worker.py measures that.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import cpattn
from launch_util import TORCHRUN, run

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "launch"))

from model import ModelConfig, TinyLM, token_loss_sum  # noqa: E402

SEQ = 17


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model():
    torch.manual_seed(0)
    return TinyLM(ModelConfig(dim=32, heads=4, kv_heads=2, layers=2))


def _tokens():
    return torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(1))


def _step(model, tokens, provider="native"):
    model.zero_grad()
    with cpattn.attention_provider(provider):
        logits = model(tokens, torch.arange(tokens.shape[1]))
    (token_loss_sum(logits, tokens) / tokens.numel()).backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


def _assert_matches(got, ref, atol=1e-5):
    (logits, grads), (ref_logits, ref_grads) = got, ref
    assert (logits - ref_logits).abs().max().item() <= atol
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max().item() <= atol


class RecordingBackend:
    """A dynamo backend that keeps every FX graph it is given and runs it as is."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def targets(self):
        return [str(n.target) for gm in self.graphs for n in gm.graph.nodes if n.op == "call_function"]


def test_no_graph_break_in_attention():
    model, tokens = _model(), _tokens()
    with cpattn.attention_provider("native"):
        explain = torch._dynamo.explain(model)(tokens, torch.arange(SEQ))
    assert explain.graph_break_count == 0, [r.reason.splitlines()[0] for r in explain.break_reasons]
    assert explain.graph_count == 1
    backend = RecordingBackend()
    with cpattn.attention_provider("native"):
        torch.compile(model, backend=backend, fullgraph=True)(tokens, torch.arange(SEQ))
    targets = backend.targets()
    assert targets.count("cpattn.attention_fwd.default") == 2, targets  # one per layer, in the graph


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_matches_eager(backend):
    model, tokens = _model(), _tokens()
    reference = _step(model, tokens)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    _assert_matches(_step(compiled, tokens), reference)
    _assert_matches(_step(compiled, tokens), reference)  # the compiled graph again


def test_provider_is_read_at_run_time(monkeypatch):
    """A graph traced under one provider runs the provider active when it is called, and its backward."""
    model, tokens = _model(), _tokens()
    reference = _step(model, tokens, "_native_math")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    _step(compiled, tokens, "native")
    math = cpattn.get_provider("_native_math")
    calls = []
    for name in ("forward", "backward"):
        real = getattr(math, name)
        monkeypatch.setattr(math, name, lambda *a, _n=name, _r=real: calls.append(_n) or _r(*a))
    _assert_matches(_step(compiled, tokens, "_native_math"), reference)
    assert calls.count("forward") == 2 and calls.count("backward") == 2, calls


def test_refusal_is_the_eager_error():
    model, tokens = _model(), _tokens()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with pytest.raises(cpattn.UnsupportedInputError) as eager:
        _step(model, tokens, "_native_efficient")  # CUDA only
    with pytest.raises(cpattn.UnsupportedInputError) as traced:
        _step(compiled, tokens, "_native_efficient")
    assert str(traced.value) == str(eager.value)


@pytest.mark.parametrize("masked", [False, True])
def test_custom_op_opcheck(masked):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 9, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, 9, 8, generator=gen, requires_grad=True) for _ in range(2))
    mask = torch.rand(2, 1, 9, 9, generator=gen) < 0.8 if masked else None
    with cpattn.attention_provider("native"):
        result = torch.library.opcheck(torch.ops.cpattn.attention_fwd.default,
                                       (q, k, v, mask, 0.0, not masked, 8 ** -0.5, True, True))
    assert set(result.values()) == {"SUCCESS"}, result


def test_eager_dispatch_does_not_use_the_custom_op(monkeypatch):
    from cpattn import compiled

    monkeypatch.setattr(compiled, "attention_fwd", lambda *a: pytest.fail("eager call went to the custom op"))
    q = torch.randn(1, 2, 5, 8)
    out = cpattn.attention_dispatch(q, q, q, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert torch.equal(out, ref)


@pytest.mark.distributed
def test_context_parallel_compiled(tmp_path):
    out = tmp_path / "compile_cp.json"
    code, log = run(TORCHRUN + ["--standalone", "--nproc-per-node=2", os.path.join(os.path.dirname(HERE), "support", "compile_cp_worker.py"),
                                str(out), "aot_eager"], timeout=240)
    assert code == 0, log[-4000:]
    r = json.loads(out.read_text())
    for phase in ("cp", "cp_again", "single_after_cp", "single_first", "cp_after_single"):
        assert r[phase]["logits_err"] <= 1e-5, (phase, r[phase])
        assert r[phase]["grad_err"] <= 1e-5, (phase, r[phase])
    # The documented graph breaks under CP: the eagerly run schedule, one per attention call, nothing else.
    assert r["break_reasons"] and all("disable" in reason for reason in r["break_reasons"]), r["break_reasons"]
    assert 2 <= r["graph_break_count"] <= 3, r
