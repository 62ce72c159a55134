"""The conversion loop: teacher (frozen) -> quantized student trained by distillation, with accelerate.

Same engine as from-scratch training (bitllm.train.trainer): one CPU, a GPU, or `accelerate launch` (DDP); the
data position and the schedules are pure functions of the step, and atomic checkpoints make `resume` bit-exact.
Writes under output_dir: checkpoint/ (training state), model/ (the packed bitllm checkpoint + tokenizer),
convert_config.json, report.json, report.md, loss.png.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitllm.convert.config import PACK_FORMAT, ConvertConfig, lambda_at, lr_at
from bitllm.convert.data import conversion_data
from bitllm.convert.losses import distill_loss
from bitllm.convert.student import build_student, load_teacher, resolve_teacher_dtype
from bitllm.errors import BitLLMError
from bitllm.formats.atomic import atomic_write_bytes
from bitllm.train.data import batch_indices, eval_windows
from bitllm.train.trainer import (
    TrainingDivergedError,
    check_grad_norm,
    heldout_perplexity,
    load_checkpoint,
    resume_advice,
    save_checkpoint,
    start_fresh_run,
)
from bitllm.train.trainer import _accelerator  # the same accelerate setup as training (reads cfg.mixed_precision)

CKPT = "checkpoint"
FIX = "lower --lr or raise --warmup-steps"  # the knobs a diverged conversion should turn
MODEL = "model"
TEACHER_DATA = "teacher_data.pt"


@dataclass
class ConvertResult:
    output_dir: Path
    model_dir: Path
    report: dict[str, Any] = field(default_factory=dict)
    is_main_process: bool = True

    @property
    def teacher_ppl(self) -> dict[str, float]:
        return self.report.get("teacher_ppl", {})

    @property
    def student_ppl(self) -> dict[str, float]:
        return self.report.get("student_ppl", {})


def quant_config(cfg: ConvertConfig):
    """The bitllm layer config of a conversion method (λ starts at 0 for QAT, the warm-up raises it)."""
    from bitllm.quant.config import OneBitConfig, TernaryConfig

    if cfg.method == "onebit":
        return OneBitConfig(svid=cfg.svid)
    return TernaryConfig(input_norm=cfg.input_norm, lam=lambda_at(cfg, 0))


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def freeze_embeddings(student: nn.Module) -> None:
    """Keep the token embeddings at the teacher's values: a tied lm_head (the same tensor) with them, an
    untied one keeps training (it is the full-precision layer the student most needs to adapt)."""
    student.get_input_embeddings().requires_grad_(False)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (latent weights, embeddings); none on g, h, norms and biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    weights = (".safetensors", ".bin", ".gguf")
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in weights)


def _teacher_bytes(spec: str, teacher: nn.Module) -> dict[str, Any]:
    """Size of the teacher's own files when local, and of its weights at 16 bits per parameter."""
    params = sum(p.numel() for p in teacher.parameters())
    p = Path(spec).expanduser()
    files = _dir_bytes(p) if p.exists() else None
    return {"teacher_params": params, "teacher_bytes_16bit": 2 * params, "teacher_file_bytes": files}


def _evaluate(model: nn.Module, heldout: dict[str, torch.Tensor], cfg: ConvertConfig) -> dict[str, float]:
    return {split: heldout_perplexity(model, eval_windows(ids, cfg.seq_len, cfg.max_eval_tokens))
            for split, ids in heldout.items()}


def run_conversion(cfg: ConvertConfig, *, resume: bool = False, overwrite: bool = False,
                   progress: bool = True) -> ConvertResult:
    """Convert cfg.teacher with cfg.method and write the packed student, the report and the loss plot."""
    from tqdm.auto import tqdm

    from bitllm.quant.api import set_lambda_

    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    ckpt_dir = out / CKPT
    resuming = resume and (ckpt_dir / "state.json").exists()
    accelerator = _accelerator(cfg)
    main = accelerator.is_main_process
    if main and not resuming:
        start_fresh_run(out, cfg, "convert_config.json", "conversion", (CKPT, MODEL, TEACHER_DATA), overwrite)
    accelerator.wait_for_everyone()

    teacher, tokenizer = load_teacher(cfg.teacher, cfg.teacher_dtype)
    teacher.to(accelerator.device)
    with accelerator.main_process_first():  # rank 0 samples (and caches) teacher data; the others read it
        data = conversion_data(cfg, tokenizer, teacher, out / TEACHER_DATA)
    world = accelerator.num_processes
    if cfg.batch_size % world:
        raise BitLLMError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
    per_rank = cfg.batch_size // world
    micro = min(cfg.micro_batch_size or per_rank, per_rank)
    if per_rank % micro:
        raise BitLLMError(f"per-process batch {per_rank} is not divisible by micro_batch_size {micro}")

    state: dict[str, Any] = {"step": 0, "losses": [], "kd": [], "hidden": [], "ce": [], "lrs": [], "lams": [],
                             "step_times": [], "last_good_checkpoint": None, "teacher_ppl": None,
                             "init_s": 0.0}
    t0 = time.perf_counter()
    student = build_student(teacher, quant_config(cfg), init=not resuming)
    if cfg.freeze_embeddings:
        freeze_embeddings(student)
    init_s = time.perf_counter() - t0
    params = sum(p.numel() for p in student.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(_param_groups(student, cfg.weight_decay), lr=cfg.peak_lr, betas=cfg.betas)
    if resuming:
        state = load_checkpoint(ckpt_dir, student, opt, cfg)
        state.pop("config")
        state.pop("python_random")
    else:
        state["init_s"] = init_s
    if state["teacher_ppl"] is None and main:
        state["teacher_ppl"] = _evaluate(teacher, data.heldout, cfg)
    student, opt = accelerator.prepare(student, opt)
    student.train()

    distill = cfg.distill
    want_hidden = distill and cfg.kd_beta > 0
    bar = tqdm(total=cfg.steps, initial=state["step"], disable=not (main and progress), unit="step",
               desc=f"convert {cfg.method}", dynamic_ncols=True)
    overflows = 0  # consecutive fp16 steps the loss scaler skipped
    try:
        for step in range(state["step"], cfg.steps):
            t_step = time.perf_counter()
            lr = lr_at(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            lam = lambda_at(cfg, step)
            set_lambda_(accelerator.unwrap_model(student), lam)
            idx = batch_indices(data.train.shape[0], step, cfg.batch_size, cfg.seed)
            mine = idx[accelerator.process_index * per_rank:(accelerator.process_index + 1) * per_rank]
            sums = torch.zeros(4, device=accelerator.device)  # total, kd, hidden, ce
            n_micro = per_rank // micro
            for j in range(n_micro):
                x = data.train[mine[j * micro:(j + 1) * micro]].to(accelerator.device)  # (micro, T)
                t_out = None
                if distill:
                    with torch.no_grad():
                        t_out = teacher(input_ids=x, output_hidden_states=want_hidden)
                sync = j == n_micro - 1  # all-reduce the gradients once per optimizer step
                with accelerator.no_sync(student) if not sync else contextlib.nullcontext():
                    s_out = student(input_ids=x, output_hidden_states=want_hidden)
                    parts = distill_loss(s_out, t_out, x, cfg.kd_alpha, cfg.kd_scale,
                                         cfg.kd_beta if want_hidden else 0.0)
                    accelerator.backward(parts.total / n_micro)
                del t_out, s_out  # a 262k-vocab model's logits are the biggest tensors in the step
                sums += torch.tensor([parts.total.item(), parts.kd, parts.hidden, parts.ce],
                                     device=accelerator.device) / n_micro
            total, kd, hid, ce = accelerator.reduce(sums, reduction="mean").tolist()
            if not math.isfinite(total):
                raise TrainingDivergedError(f"loss is {total} at step {step + 1}; conversion stopped. "
                                            + resume_advice(state, ckpt_dir, FIX))
            if cfg.grad_clip > 0:
                norm = accelerator.clip_grad_norm_(student.parameters(), cfg.grad_clip)
                overflows = check_grad_norm(norm, accelerator, overflows, step,
                                            "stopped before the update. " + resume_advice(state, ckpt_dir, FIX))
            opt.step()
            opt.zero_grad(set_to_none=True)
            state["step"] = step + 1
            for k, v in (("losses", total), ("kd", kd), ("hidden", hid), ("ce", ce), ("lrs", lr), ("lams", lam),
                         ("step_times", time.perf_counter() - t_step)):
                state[k].append(v)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}", ce=f"{ce:.3f}", lr=f"{lr:.1e}", lam=f"{lam:.2f}")
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                state["last_good_checkpoint"] = step + 1
                if main:
                    save_checkpoint(ckpt_dir, accelerator.unwrap_model(student), opt, cfg, state)
                accelerator.wait_for_everyone()
                _after_checkpoint(step + 1)
    finally:
        bar.close()

    result = None
    if main:
        result = _finish(accelerator.unwrap_model(student), teacher, tokenizer, data, cfg, state, params, out,
                         world, time.perf_counter() - t_start)
    accelerator.wait_for_everyone()
    if result is None:
        path = out / "report.json"
        result = ConvertResult(out, out / MODEL, json.loads(path.read_text()) if path.exists() else {}, False)
    return result


def _after_checkpoint(step: int) -> None:
    """Hook run on every process after each checkpoint (tests use it to stop a run at a known point)."""


def _finish(student: nn.Module, teacher: nn.Module, tokenizer, data, cfg: ConvertConfig, state: dict, params: int,
            out: Path, processes: int, wall_s: float) -> ConvertResult:
    from bitllm.formats.checkpoint import save_pretrained
    from bitllm.quant.api import set_lambda_
    from bitllm.train.plot import plot_losses

    notes = []
    if cfg.method == "qat" and state["lams"] and state["lams"][-1] < 1.0:
        notes.append(f"the λ warm-up ({cfg.lambda_steps} steps) did not finish within {cfg.steps} steps: the last "
                     f"update saw λ={state['lams'][-1]:.2f}, the packed model is fully quantized (λ=1)")
    set_lambda_(student, 1.0)  # the packed model is the fully quantized one
    student_ppl = _evaluate(student, data.heldout, cfg)
    model_dir = save_pretrained(student, out / MODEL, PACK_FORMAT[cfg.method], tokenizer=tokenizer)
    times = state["step_times"]
    steady = times[2:] if len(times) > 4 else times
    step_time = sum(steady) / max(len(steady), 1)
    report = {
        "teacher": cfg.teacher, "method": cfg.method, "format": PACK_FORMAT[cfg.method],
        "svid": cfg.svid if cfg.method == "onebit" else None, "distill": cfg.distill,
        "data": data.source, "steps": state["step"], "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
        "tokens_seen": state["step"] * cfg.batch_size * cfg.seq_len, "train_blocks": int(data.train.shape[0]),
        "processes": processes, "trainable_params": params,
        "teacher_ppl": state["teacher_ppl"], "student_ppl": student_ppl,
        "teacher_dtype": resolve_teacher_dtype(cfg.teacher_dtype),
        **_teacher_bytes(cfg.teacher, teacher),
        "student_bytes": _dir_bytes(model_dir),
        "init_s": state["init_s"], "step_time_s": step_time,
        "tokens_per_s": cfg.batch_size * cfg.seq_len / step_time if step_time else 0.0,
        "wall_s_this_session": wall_s, "peak_rss_mb": peak_rss_mb(),
        "final_loss": state["losses"][-1] if state["losses"] else None,
        "losses": state["losses"], "kd": state["kd"], "hidden": state["hidden"], "ce": state["ce"],
        "lrs": state["lrs"], "lams": state["lams"], "notes": notes,
        "config": cfg.to_dict(),
    }
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(out / "report.md", markdown_report(report).encode())
    curves = {"student CE (nats/token)": state["ce"]}
    if cfg.distill:
        curves = {"total loss": state["losses"], f"{cfg.kd_scale:g}·KL(T‖S)": [cfg.kd_scale * v for v in state["kd"]],
                  "hidden-state MSE": state["hidden"], **curves}
    plot_losses(curves, out / "loss.png", title=f"{cfg.method} conversion of {Path(cfg.teacher).name}")
    print(f"peak RSS {report['peak_rss_mb']:.0f} MiB")
    return ConvertResult(out, model_dir, report)


def markdown_report(r: dict) -> str:
    """A human-readable summary of report.json."""
    lines = [f"# {r['method']} conversion of `{r['teacher']}`", "",
             f"{r['steps']} steps × {r['batch_size']} × {r['seq_len']} tokens = {r['tokens_seen']:,} tokens "
             f"({r['data']}); distillation {'on' if r['distill'] else 'off (plain CE)'}"
             + (f", SVID {'on' if r['svid'] else 'off'}" if r['svid'] is not None else "") + ".", "",
             "| held-out split | teacher ppl | student ppl | ratio |", "|---|---|---|---|"]
    for split, s in r["student_ppl"].items():
        t = (r["teacher_ppl"] or {}).get(split, float("nan"))
        lines.append(f"| {split} | {t:.2f} | {s:.2f} | {s / t:.2f}× |")
    tf = r["teacher_file_bytes"]
    lines += ["", "| | value |", "|---|---|",
              f"| teacher parameters | {r['teacher_params']:,} |",
              f"| teacher at 16 bits | {r['teacher_bytes_16bit'] / 2**20:.1f} MiB |",
              f"| teacher files | {'n/a (hub)' if tf is None else f'{tf / 2**20:.1f} MiB'} |",
              f"| student checkpoint ({r['format']}) | {r['student_bytes'] / 2**20:.1f} MiB |",
              f"| student init (SVID etc.) | {r['init_s']:.1f} s |",
              f"| time per step | {r['step_time_s']:.2f} s ({r['tokens_per_s']:,.0f} tokens/s) |",
              f"| wall time (this session) | {r['wall_s_this_session']:.0f} s |",
              f"| peak RSS | {r['peak_rss_mb']:.0f} MiB |",
              f"| final loss | {r['final_loss']:.4f} |", "", "![loss](loss.png)", ""]
    if r.get("zero_shot"):
        from bitllm.convert.zero_shot import zero_shot_from

        lines += [zero_shot_from(r)]
    lines += [f"Note: {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def convert(model: str, method: str = "onebit", output: str | Path = "runs/convert", *, resume: bool = False,
            overwrite: bool = False, progress: bool = True, **options: Any) -> ConvertResult:
    """Convert `model` (HF directory, hub id or .gguf file) to a 1-bit (`onebit`) or 1.58-bit (`qat`) bitllm
    checkpoint in `output`/model; `options` are ConvertConfig fields (steps=, data=, lr=, distill=, ...)."""
    cfg = ConvertConfig(teacher=str(model), method=method, output_dir=str(output), **options)
    return run_conversion(cfg, resume=resume, overwrite=overwrite, progress=progress)
