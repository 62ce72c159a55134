"""Zero-shot comparison of a conversion's teacher and student: how much of the teacher's score above chance
the student keeps.

    share kept = (mean student acc − mean chance) / (mean teacher acc − mean chance)

over the tasks both were scored on (OneBit's claim on LLaMA models was 80–83 % of raw accuracy; issue 7 sets
the goal at 0.81 of the score above chance). `bitllm convert ... --zero-shot local` runs it after the
conversion; on a finished run, `bitllm convert ... --resume --zero-shot local` adds it to the report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bitllm.errors import BitLLMError

GOAL = 0.81

# Chance accuracy (metric "acc") of the tasks this is used with: multiple choice = 1 / choices; a cloze
# scored on the greedy continuation has no chance level to speak of (0).
CHANCE = {
    "local_nextsent_id": 0.25, "local_nextsent_ood": 0.25, "local_lambada_id": 0.0, "local_lambada_ood": 0.0,
    "hellaswag": 0.25, "arc_easy": 0.25, "arc_challenge": 0.25, "openbookqa": 0.25, "piqa": 0.5,
    "winogrande": 0.5, "boolq": 0.5, "lambada_openai": 0.0, "lambada_standard": 0.0,
}


def kept_share(teacher_rows: list[dict], student_rows: list[dict], chance: dict[str, float] | None = None) -> dict:
    """Per-task and average `acc` of teacher and student (rows as `bitllm.eval.harness.summarize` returns
    them) and the share of the teacher's score above chance that the student keeps."""
    chance = CHANCE if chance is None else chance
    acc_t = {r["task"]: r["value"] for r in teacher_rows if r["metric"] == "acc"}
    acc_s = {r["task"]: r["value"] for r in student_rows if r["metric"] == "acc"}
    common = sorted(set(acc_t) & set(acc_s))
    tasks = [t for t in common if t in chance]
    if not tasks:
        raise BitLLMError(f"no task with an 'acc' metric and a known chance level in both results (teacher: "
                          f"{sorted(acc_t)}, student: {sorted(acc_s)}); known: {sorted(chance)}")
    rows = []
    for t in tasks:
        c, a, b = chance[t], acc_t[t], acc_s[t]
        rows.append({"task": t, "chance": c, "teacher": a, "student": b,
                     "kept": (b - c) / (a - c) if a > c else None})
    mt = sum(r["teacher"] for r in rows) / len(rows)
    ms = sum(r["student"] for r in rows) / len(rows)
    mc = sum(r["chance"] for r in rows) / len(rows)
    return {"tasks": rows, "teacher_avg": mt, "student_avg": ms, "chance_avg": mc,
            "share_kept": (ms - mc) / (mt - mc) if mt > mc else None, "goal": GOAL,
            "skipped": [t for t in common if t not in chance]}


def markdown(z: dict) -> str:
    """The zero-shot section of report.md."""
    lines = [f"## Zero-shot accuracy ({', '.join(z['task_names'])}; limit {z['limit']})", "",
             "| task | chance | teacher acc | student acc | kept above chance |", "|---|---|---|---|---|"]
    for r in z["tasks"]:
        kept = "-" if r["kept"] is None else f"{r['kept']:.2f}"
        lines.append(f"| {r['task']} | {r['chance']:.2f} | {r['teacher']:.3f} | {r['student']:.3f} | {kept} |")
    share = z["share_kept"]
    lines += [f"| **average** | {z['chance_avg']:.3f} | {z['teacher_avg']:.3f} | {z['student_avg']:.3f} | "
              f"**{'-' if share is None else f'{share:.2f}'}** |", "",
              f"Share of the teacher's average score above chance kept by the student: "
              f"{'n/a' if share is None else f'{share:.2f}'} (goal {z['goal']:.2f}: "
              f"{'met' if share is not None and share >= z['goal'] else 'not met'})."]
    if z["skipped"]:
        lines.append(f"Tasks without a known chance level, left out of the average: {', '.join(z['skipped'])}.")
    return "\n".join(lines) + "\n"


def run_zero_shot(output_dir: str | Path, teacher: str, tasks: list[str], *, limit: float | None = None,
                  threads: int | None = None, progress: bool = True) -> dict:
    """Score the teacher (`teacher`: the conversion's teacher spec) and the student (`output_dir`/model) on
    lm-eval `tasks`, then add the comparison to `output_dir`/report.json and report.md. Each model's full
    results go to `output_dir`/zero_shot/{teacher,student}/eval.json."""
    from bitllm.convert.run import MODEL, markdown_report
    from bitllm.eval.runner import evaluate
    from bitllm.formats.atomic import atomic_write_bytes

    out = Path(output_dir)
    report_path = out / "report.json"
    if not report_path.exists() or not (out / MODEL).is_dir():
        raise BitLLMError(f"{out} holds no finished conversion (report.json and {MODEL}/); run the conversion first")
    # a GGUF teacher is scored as the conversion saw it: transformers' dequantized model
    teacher_backend = "transformers" if str(teacher).lower().endswith(".gguf") else "auto"
    res = {}
    for name, spec, backend in (("teacher", teacher, teacher_backend), ("student", str(out / MODEL), "auto")):
        res[name] = evaluate(spec, tasks=list(tasks), limit=limit, threads=threads, backend=backend,
                             output=out / "zero_shot" / name, progress=progress)["zeroshot"]
    z = kept_share(res["teacher"], res["student"]) | {"task_names": list(tasks), "limit": limit}
    report = json.loads(report_path.read_text())
    report["zero_shot"] = z
    atomic_write_bytes(report_path, (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(out / "report.md", markdown_report(report).encode())
    return z


def zero_shot_from(report: dict[str, Any]) -> str:
    """report.md's zero-shot section, or '' when the report has none."""
    return markdown(report["zero_shot"]) if report.get("zero_shot") else ""
