"""Loss curves of a quantized model and its full-precision twin on one PNG (matplotlib, Agg: no display)."""

from __future__ import annotations

from pathlib import Path

from bitllm.formats.atomic import atomic_write_bytes


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the raw per-step loss of a small batch is noisy)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_losses(curves: dict[str, list[float]], path: str | Path, title: str = "training loss",
                tokens_per_step: int | None = None) -> Path:
    """One line per run (label -> per-step loss), raw faint and smoothed solid; written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for i, (label, losses) in enumerate(curves.items()):
        xs = [(s + 1) * (tokens_per_step or 1) for s in range(len(losses))]
        color = f"C{i}"
        ax.plot(xs, losses, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(xs, smooth(losses, max(1, len(losses) // 30)), color=color, linewidth=1.8, label=label)
    ax.set_xlabel("tokens" if tokens_per_step else "step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path
