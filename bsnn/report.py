"""Tables (markdown / CSV / JSON) and matplotlib plots of results people look at."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Sequence

from bsnn.io import atomic_write_json, atomic_write_text, write_failure


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub-flavoured markdown table; floats with 2 decimals."""
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.2f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_text(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(headers)
    w.writerows(rows)
    return buf.getvalue()


def write_table(stem: str | os.PathLike, headers: Sequence[str], rows: Sequence[Sequence], payload: dict | None = None
                ) -> dict[str, Path]:
    """Write ``stem.md``, ``stem.csv`` and ``stem.json`` (``payload`` or the rows) atomically."""
    stem = Path(stem)
    paths = {ext: stem.with_suffix("." + ext) for ext in ("md", "csv", "json")}
    atomic_write_text(paths["md"], markdown_table(headers, rows))
    atomic_write_text(paths["csv"], csv_text(headers, rows))
    atomic_write_json(paths["json"], payload if payload is not None else
                      {"headers": list(headers), "rows": [list(r) for r in rows]})
    return paths


def sweep_rows(result) -> tuple[list[str], list[list]]:
    """Rows of an accuracy-vs-T table from a :class:`bsnn.simulate.SimResult`."""
    headers = ["T", "SNN accuracy (%)", "ANN accuracy (%)", "gap (points)", "mean firing rate"]
    rows = []
    for t in result.timesteps:
        rates = result.firing_rates(t)
        mean_rate = sum(rates.values()) / max(1, len(rates))
        gap = None if result.ann_accuracy is None else result.ann_accuracy - result.accuracy[t]
        rows.append([t, result.accuracy[t], result.ann_accuracy, gap, round(mean_rate, 4)])
    return headers, rows


def plot_sweep(result, path: str | os.PathLike, title: str = "") -> Path:
    """Two panels: accuracy vs T (log2 axis, ANN accuracy as a line) and per-layer firing rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    ts = result.timesteps
    a.plot(ts, [result.accuracy[t] for t in ts], "o-", label="SNN")
    if result.ann_accuracy is not None:
        a.axhline(result.ann_accuracy, color="k", ls="--", label=f"ANN {result.ann_accuracy:.2f} %")
    a.set_xscale("log", base=2)
    a.set_xlabel("timesteps T")
    a.set_ylabel("accuracy (%)")
    a.grid(alpha=0.3)
    a.legend()
    a.set_title(title or "accuracy vs timesteps")
    rates = result.firing_rates()
    names = list(rates)
    b.bar(range(len(names)), [100 * rates[n] for n in names])
    b.set_xticks(range(len(names)), [n.removeprefix("if_") for n in names], rotation=45, ha="right", fontsize=8)
    b.set_ylabel(f"firing rate (% per step, T={max(ts)})")
    b.set_title("firing rate per IF layer")
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write the matplotlib figure ``fig`` to ``path`` atomically (a temporary file, then a rename; a failed write
    leaves no partial file and raises :class:`~bsnn.errors.OutputError` naming the path) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_failure(path, e) from None
    finally:
        plt.close(fig)
    return path


def write_sweep(result, out_dir: str | os.PathLike, stem: str = "sweep", title: str = "") -> dict[str, Path]:
    """Write ``sweep.{md,csv,json}`` and ``sweep.png`` for a simulation result into ``out_dir``."""
    out_dir = Path(out_dir)
    headers, rows = sweep_rows(result)
    paths = write_table(out_dir / stem, headers, rows, result.to_dict())
    paths["png"] = plot_sweep(result, out_dir / f"{stem}.png", title)
    return paths
