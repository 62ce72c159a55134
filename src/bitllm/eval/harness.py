"""Drive lm-eval (`lm_eval.simple_evaluate`) with the "bitllm" model registered.

lm-eval 0.4.13 discovers no plugins by entry point, so `bitllm eval MODEL --tasks ...` is the way
to run the adapter from a shell; `lm_eval.simple_evaluate(model="bitllm", ...)` works after
`import bitllm.eval`. `--tasks local` builds the offline tasks (bitllm.eval.tasks) on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bitllm.errors import BitLLMError


def _is_local(task: str) -> bool:
    return task == "local" or task.startswith("local_")


def run_lm_eval(model: str, tasks: list[str], *, model_type: str = "bitllm", model_args: str = "",
                include_path: str | Path | None = None, num_fewshot: int | None = None,
                limit: int | float | None = None, batch_size: int | str | None = None,
                threads: int | None = None, backend: str = "auto", extra: dict[str, Any] | None = None,
                log_samples: bool = False) -> dict:
    """Evaluate `model` on lm-eval `tasks` and return lm-eval's results dict.

    `model_type` "bitllm" uses bitllm's adapter; "hf" runs lm-eval's own transformers model on the
    same checkpoint (ternary I2 checkpoints are plain HF checkpoints) for a side-by-side check.
    `extra` passes further keyword arguments to `lm_eval.simple_evaluate` unchanged.
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise BitLLMError("zero-shot evaluation needs lm-eval: pip install lm-eval==0.4.13") from None
    import bitllm.eval  # noqa: F401  (registers "bitllm")
    from bitllm.eval.tasks import build_local_tasks, default_task_dir

    if model_type != "bitllm":
        # lm-eval fills its model registry lazily only while it is empty, and importing bitllm.eval
        # registered "bitllm" first: import lm-eval's own models (hf, ...) so that the name resolves
        import lm_eval.models  # noqa: F401

    paths = [str(include_path)] if include_path else []
    if any(_is_local(t) for t in tasks) and not include_path:
        d = default_task_dir()
        if not (d / "manifest.json").exists():
            build_local_tasks(d)
        paths.append(str(d))
    # indexing lm-eval's thousands of bundled task configs takes a while: skip it when every task is local
    only_local = all(_is_local(t) for t in tasks) or (include_path and not _needs_defaults(tasks, paths))
    tm = TaskManager(include_path=paths or None, include_defaults=not only_local)
    args = model_args
    if model_type == "bitllm":
        args = ",".join(a for a in (f"pretrained={model}", f"threads={threads}" if threads else "",
                                    f"backend={backend}", model_args) if a)
    elif model_type == "hf" and "pretrained=" not in args:
        args = ",".join(a for a in (f"pretrained={model}", "dtype=float32", model_args) if a)
    results = lm_eval.simple_evaluate(model=model_type, model_args=args, tasks=tasks, num_fewshot=num_fewshot,
                                      limit=limit, batch_size=batch_size, task_manager=tm, log_samples=log_samples,
                                      device="cpu", **(extra or {}))
    if results is None:
        raise BitLLMError("lm-eval returned no results")
    return results


def _needs_defaults(tasks: list[str], paths: list[str]) -> bool:
    """Whether some task is not defined by a YAML under `paths` (so lm-eval's own tasks are needed)."""
    names: set[str] = set()
    for p in paths:
        for y in Path(p).rglob("*.yaml"):
            for line in y.read_text(encoding="utf-8").splitlines():
                if line.startswith(("task:", "tag:", "group:")):
                    names.update(x.strip(" []'\"") for x in line.split(":", 1)[1].split(","))
    return any(t not in names for t in tasks)


def summarize(results: dict) -> list[dict]:
    """One row per (task, metric) with value and stderr, from lm-eval's results dict."""
    rows = []
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            err = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "value": float(value),
                         "stderr": float(err) if isinstance(err, (int, float)) else None,
                         "n": results.get("n-samples", {}).get(task, {}).get("effective")})
    return rows
