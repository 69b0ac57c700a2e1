"""How results come out: a table on standard output, and on request a JSON file and a plot."""
import json


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def print_table(rows: list[dict], columns: list[str]) -> None:
    """One row per dict; a column is as wide as its widest cell, at least 12 characters."""
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in (row.get(c, "") for c in columns)]
             for row in rows]
    widths = [max(12, len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    for line in [columns, *cells]:
        print(" | ".join(f"{cell:>{width}}" for cell, width in zip(line, widths)))


def save(rows: list[dict], json_path: str | None, plot_path: str | None) -> None:
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    if plot_path:
        plot(rows, plot_path)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if "rate" in rows[0]:
        plot_online(plt, rows, path)
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r.get('preset', r.get('mode'))} b{r.get('batch', '')} c{r.get('context', '')}" for r in rows]
    key = "seq/floor" if "seq/floor" in rows[0] else "tok_per_s"
    ax.bar(range(len(rows)), [r[key] for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
    ax.set_ylabel(key)
    fig.tight_layout()
    fig.savefig(path)


def plot_online(plt, rows: list[dict], path: str) -> None:
    """ITL p99 and output tok/s against the arrival rate, one line per mode."""
    rows = [r for r in rows if "rate" in r]  # not the goodput rows of --goodput
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        for ax, key in zip(axes, ("itl_p99_ms", "tok_per_s")):
            ax.plot([r["rate"] for r in mine], [r[key] for r in mine], marker="o", label=mode)
    for ax, key in zip(axes, ("inter-token latency p99 (ms)", "output tok/s")):
        ax.set_xscale("log")
        ax.set_xlabel("arrival rate (requests/s)")
        ax.set_ylabel(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
