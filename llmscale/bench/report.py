"""The benchmark's rows as a console table, CSV, JSON and a PNG bar chart of tokens/s per device."""

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List

try:
    # The object API with Agg's PNG writer: no display and no global pyplot state.
    from matplotlib.figure import Figure
except ModuleNotFoundError as error:
    raise ModuleNotFoundError("the benchmark plots with matplotlib: pip install -e '.[bench]'") \
        from error

from llmscale.bench.plans import Row

# Header, Row field, format; the table and the CSV show these (the JSON shows every field).
COLUMNS = [
    ("plan", "plan", "{}"),
    ("ranks", "world_size", "{}"),
    ("micro", "micro_batch_size", "{}"),
    ("global", "global_batch_size", "{}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("tokens/s/dev", "tokens_per_s_per_device", "{:,.0f}"),
    ("TFLOP/s/dev", "tflops_per_device", "{:.4g}"),
    ("MFU", "mfu", "{:.1%}"),
    ("mem GiB/rank", "peak_memory_gib", "{:.2f}"),
    ("RSS GiB/rank", "peak_rss_gib", "{:.2f}"),
    ("dev vs bare", "vs_bare", "{:.2f}"),
]


def _cell(value: Any, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def format_table(rows: List[Row]) -> str:
    """Failed runs show `failed` and their error below the table."""
    cells = [[header for header, _, _ in COLUMNS]]
    for row in rows:
        values = [_cell(getattr(row, name), fmt) for _, name, fmt in COLUMNS]
        cells.append(values[:4] + ["failed"] + [""] * (len(COLUMNS) - 5) if row.error else values)
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(line, widths))) for line in cells]
    lines += [f"{row.plan}, micro-batch {row.micro_batch_size}: {row.error}"
              for row in rows if row.error]
    return "\n".join(lines)


def write_csv(rows: List[Row], path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow([name for _, name, _ in COLUMNS] + ["bare_tokens_per_s", "error"])
        for row in rows:
            writer.writerow([getattr(row, name) for _, name, _ in COLUMNS]
                            + [row.bare_tokens_per_s, row.error])


def write_json(rows: List[Row], context: Dict[str, Any], path: Path) -> None:
    """`context`: how the benchmark was run (command, steps, machine load)."""
    report = {**context, "rows": [dataclasses.asdict(row) for row in rows]}
    path.write_text(json.dumps(report, indent=2) + "\n")


def plot_tokens_per_s(rows: List[Row], title: str, path: Path) -> None:
    tokens_per_s_chart(rows, title).savefig(path, dpi=120)


def tokens_per_s_chart(rows: List[Row], title: str) -> Figure:
    """Bars of tokens/s per device per plan, one per micro-batch size, each labelled with its
    ratio to the bare loop's (on one device)."""
    plans = list(dict.fromkeys(row.plan for row in rows))
    ranks = {row.plan: row.world_size for row in rows}
    micro_sizes = sorted({row.micro_batch_size for row in rows})
    width = 0.8 / len(micro_sizes)
    figure = Figure(figsize=(max(6.0, 1.3 * len(plans) + 2), 4.5), layout="constrained")
    axes = figure.subplots()
    for index, micro in enumerate(micro_sizes):
        shown = [row for row in rows
                 if row.micro_batch_size == micro and row.tokens_per_s_per_device]
        offset = (index - (len(micro_sizes) - 1) / 2) * width
        bars = axes.bar([plans.index(row.plan) + offset for row in shown],
                        [row.tokens_per_s_per_device for row in shown], width,
                        label=f"micro-batch {micro}")
        axes.bar_label(bars, [_cell(row.vs_bare, "{:.2f}x") for row in shown], fontsize=8)
    axes.set_xticks(range(len(plans)), [f"{plan}\n{ranks[plan]} rank(s)" for plan in plans])
    axes.set_ylabel("tokens/s per device (median)")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    return figure
