"""`python -m cpattn info`: what this machine can run, provider by provider, and why not where it cannot."""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch

from .providers import PROVIDERS


@dataclass
class ProviderRow:
    name: str
    family: str
    available: bool
    version: str
    devices: str
    requirement: str
    training: str
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
        rows.append(ProviderRow(name, provider.family, ok, avail.version or "-",
                                ", ".join(provider.supports) or "-", _requirement(provider), training, note))
    return rows


def render(rows: list[ProviderRow], env: dict[str, str]) -> str:
    lines = [f"{k}: {v}" for k, v in env.items()]
    header = ("provider", "family", "runs here", "library", "needs", "training", "why not / notes")
    table = [header] + [(r.name, r.family, "yes" if r.available else "no", r.version, r.requirement, r.training,
                         r.note) for r in rows]
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
        return
    console = Console()
    if not console.is_terminal:  # piped or captured: do not fold provider names into a narrow table
        console = Console(width=220)
    for k, v in env.items():
        console.print(f"[bold]{k}[/bold]: {v}")
    table = Table(title="cpattn providers")
    table.add_column("provider", no_wrap=True)
    for col in ("family", "runs here", "library", "needs", "training", "why not / notes"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r.name, r.family, "[green]yes[/green]" if r.available else "[red]no[/red]", r.version,
                      r.requirement, r.training, r.note)
    console.print(table)
