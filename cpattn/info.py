"""`python -m cpattn info`: what this machine can run, provider by provider, and why not where it cannot."""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch

from .call import make_call
from .names import ALIASES
from .providers import AUTO, PROVIDERS

_ALIAS_OF = {name: alias for alias, name in ALIASES.items()}


def shown_name(name: str) -> str:
    """A provider's name as `info` and the support matrix show it: with its alias where it has one."""
    return f"{name} ({_ALIAS_OF[name]})" if name in _ALIAS_OF else name


@dataclass
class ProviderRow:
    name: str
    family: str
    available: bool
    version: str
    devices: str
    requirement: str
    training: str
    window: str
    softcap: str
    sinks: str
    note: str


def environment() -> dict[str, str]:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda (torch build)": str(torch.version.cuda),
        "cuda available": str(torch.cuda.is_available()),
    }
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        env["gpu"] = torch.cuda.get_device_name(idx)
        env["compute capability"] = f"sm{major}{minor}"
        env["gpus"] = str(torch.cuda.device_count())
    return env


def _requirement(provider) -> str:
    parts = []
    for device, caps in provider.supports.items():
        text = device
        if caps.min_compute_capability:
            text += " sm%d%d+" % caps.min_compute_capability
        parts.append(text)
    return ", ".join(parts) or "-"


def _runs_here(provider) -> tuple[bool, str]:
    """Whether the provider can run on this machine's best device, and why not."""
    avail = provider.availability()
    if not avail.ok:
        return False, avail.reason or "unavailable"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    caps = provider.capabilities(device)
    if caps is None:
        return False, f"needs {', '.join(provider.supports)}; this machine offers {device}"
    if device == "cuda" and caps.min_compute_capability:
        have = torch.cuda.get_device_capability()
        if have < caps.min_compute_capability:
            return False, "needs compute capability sm%d%d" % caps.min_compute_capability
    return True, "; ".join(caps.notes)


def provider_rows() -> list[ProviderRow]:
    rows = []
    for name, provider in PROVIDERS.items():
        ok, note = _runs_here(provider)
        avail = provider.availability()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        caps = provider.capabilities(device)
        training = "-" if caps is None else ("fwd+bwd" if caps.training else "fwd only")
        mods = _score_mods(caps) if caps is not None else {"window": _NO, "softcap": _NO, "sinks": _NO}
        rows.append(ProviderRow(shown_name(name), provider.family, ok, avail.version or "-",
                                ", ".join(provider.supports) or "-", _requirement(provider), training,
                                mods["window"], mods["softcap"], mods["sinks"], note))
    return rows


def auto_choice() -> str:
    """What provider 'auto' picks here for a typical training call (bf16 on GPU, float32 on CPU), and why."""

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    q = torch.empty(1, 16, 4096, 128, device=device, dtype=dtype, requires_grad=True)
    kv = torch.empty(1, 4, 4096, 128, device=device, dtype=dtype, requires_grad=True)
    call = make_call(q, kv, kv, None, 0.0, True, None, True)
    chosen = AUTO.choose(call)
    head = f"auto picks {chosen.name if chosen else 'nothing'} for causal GQA 16:4, S=4096, D=128, {dtype} with gradients"
    tail = ("attention_provider('auto', autotune=True) times the first three providers that take a call, once "
            "per input signature, and runs the fastest")
    return head + "\n  " + AUTO.explain(call).replace("\n", "\n  ") + "\n" + tail


def render(rows: list[ProviderRow], env: dict[str, str]) -> str:
    lines = [f"{k}: {v}" for k, v in env.items()]
    header = ("provider", "family", "runs here", "library", "needs", "training", "window", "softcap", "sinks",
              "why not / notes")
    table = [header] + [(r.name, r.family, "yes" if r.available else "no", r.version, r.requirement, r.training,
                         r.window, r.softcap, r.sinks, r.note) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
    lines.append("")
    for row in table:
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths)] + [str(row[-1])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def print_info() -> None:
    rows, env = provider_rows(), environment()
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(render(rows, env))
        print(auto_choice())
        print(fa4_path())
        return
    console = Console()
    if not console.is_terminal:  # piped or captured: do not fold provider names into a narrow table
        console = Console(width=220)
    for k, v in env.items():
        console.print(f"[bold]{k}[/bold]: {v}")
    table = Table(title="cpattn providers")
    table.add_column("provider", no_wrap=True)
    for col in ("family", "runs here", "library", "needs", "training", "window", "softcap", "sinks",
                "why not / notes"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r.name, r.family, "[green]yes[/green]" if r.available else "[red]no[/red]", r.version,
                      r.requirement, r.training, r.window, r.softcap, r.sinks, r.note)
    console.print(table)
    console.print(auto_choice(), markup=False)
    console.print(fa4_path(), markup=False)


# -- support matrix --------------------------------------------------------------------------------------

_YES, _NO = "yes", "-"


def _schedules(caps) -> dict[str, str]:
    """What each context-parallel schedule can do with a provider, derived as ContextParallel.reasons does."""
    whole = "fwd+bwd" if caps.training else "fwd"
    ring = ("fwd+bwd" if caps.backward else "fwd") if caps.returns_lse else _NO
    allgather = whole + ("" if caps.bool_mask else " (non-causal, no mask)")
    return {"ring": ring, "ulysses": whole, "hybrid": ring, "allgather": allgather}


def _score_mods(caps) -> dict[str, str]:
    """How a provider applies each score modification, as cpattn/scoremods.py routes it: 'native' (its kernel),
    'mask' (a window as a dense boolean mask), 'lse' (sinks through its log-sum-exp), '-' (refused)."""
    window = "native" if caps.window else ("mask" if caps.bool_mask else _NO)
    softcap = "native" if caps.softcap else _NO
    sinks = "native" if caps.sinks else ("lse" if caps.returns_lse else _NO)
    return {"window": window, "softcap": softcap, "sinks": sinks}


def _cross_attention(caps) -> str:
    """Whether the provider takes q_len != kv_len (key/value of another sequence): every adapter does (where
    is_causal needs square calls, its notes say so)."""
    return _YES


def _masks(caps) -> str:
    kinds = [name for name, ok in (("bool", caps.bool_mask), ("additive", caps.additive_mask),
                                   ("key-padding", caps.key_padding_mask or caps.bool_mask)) if ok]
    return ", ".join(kinds) or _NO


def _dtypes(caps) -> str:
    order = ["float16", "bfloat16", "float32", "float64"]
    names = {str(d).replace("torch.", "") for d in caps.dtypes}
    return ", ".join(n.replace("float", "f").replace("bf", "bf") for n in order if n in names)


def support_matrix_markdown() -> str:
    """The provider x device x feature x schedule table, from the adapters' declarations alone."""
    lines = [
        "# Support matrix",
        "",
        "Generated by `python -m cpattn matrix` from each provider's declared capabilities; "
        "`tests/unit/test_support_matrix.py` fails when this file and the code disagree. Schedules: what ring, "
        "Ulysses, hybrid and all-gather context parallelism accept with the provider (fwd+bwd = training). An alias "
        "is accepted wherever a name is.",
        "",
        "Score modifications (`window`, `softcap`, `sinks` of `attention_dispatch`): native = the kernel applies it "
        "(a window skips the work outside it); mask = a window as an exact boolean mask (dense: every score is "
        "computed); lse = sinks added exactly through the provider's log-sum-exp (with gradients where it trains); "
        "- = refused, with a reason naming a provider that takes it. cross-attention: key/value of another length "
        "than the queries (q_len != kv_len) on one device.",
        "",
        "| provider | device | alias | dtypes | head dim | min arch | causal | masks | GQA | dropout | training | LSE | "
        "window | softcap | sinks | cross-attention | ring | ulysses | hybrid | allgather |",
        "|" + " --- |" * 20,
    ]
    for name, provider in PROVIDERS.items():
        for device, caps in provider.supports.items():
            head = f"<= {caps.max_head_dim}" if caps.max_head_dim else "any"
            if caps.head_dim_multiple > 1:
                head += f", x{caps.head_dim_multiple}"
            arch = "sm%d%d" % caps.min_compute_capability if caps.min_compute_capability else _NO
            sched = _schedules(caps)
            flags = [caps.causal, caps.gqa, caps.dropout, caps.training, caps.returns_lse]
            causal, gqa, dropout, training, lse = (_YES if f else _NO for f in flags)
            mods = _score_mods(caps)
            lines.append(
                f"| {name} | {device} | {_ALIAS_OF.get(name, _NO)} | {_dtypes(caps)} | {head} | {arch} | {causal} | "
                f"{_masks(caps)} | {gqa} | {dropout} | {training} | {lse} | {mods['window']} | {mods['softcap']} | "
                f"{mods['sinks']} | {_cross_attention(caps)} | {sched['ring']} | {sched['ulysses']} | "
                f"{sched['hybrid']} | {sched['allgather']} |"
            )
    lines += ["", "Notes from the adapters:", ""]
    for name, provider in PROVIDERS.items():
        for device, caps in provider.supports.items():
            for note in caps.notes:
                lines.append(f"- `{name}` ({device}): {note}")
    return "\n".join(lines) + "\n"


# -- FA4 path --------------------------------------------------------------------------------------------


def fa4_path() -> str:
    """Which FlashAttention-4 path providers 'flash' and 'flash_varlen' take on sm90 here, and why: direct kernel
    launches or the library's functions (see cpattn/providers/flash/fa4_release_window.py, CPATTN_FA4_FAST_PATHS)."""
    from .providers.flash import fast_path_status

    return (f"FA4 sm90 path: {fast_path_status(PROVIDERS['flash'])}\n"
            f"FA4 sm90 varlen path: {fast_path_status(PROVIDERS['flash_varlen'])}")
