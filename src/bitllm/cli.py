"""The `bitllm` command. One subcommand = one typed function with a docstring; no logic lives here
that the Python API does not also offer."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from bitllm.errors import BitLLMError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train, convert, pack, run and measure 1-bit and 1.58-bit LLMs.")
console = Console(stderr=True)


@app.command()
def pack(
    model: str = typer.Argument(..., help="Full-precision (latent-weight) HF checkpoint: local directory or hub id."),
    method: str = typer.Option("ternary", help="ternary | ternary-wo | binary | onebit"),
    format: str = typer.Option("i2", "--format", "-f", help="i2 | t1 | b1"),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write (replaced atomically)."),
    input_norm: bool = typer.Option(False, help="ternary/binary: add the paper's RMSNorm inside each BitLinear."),
    skip: list[str] = typer.Option(["lm_head"], help="Module names (exact, suffix or glob) to keep in full precision."),
    linear_class: str = typer.Option("bitlinear", help="HF BitNet scale convention for ternary I2: bitlinear | autobitlinear."),
) -> None:
    """Quantize a checkpoint that holds full-precision latent weights and pack it (Bitlinear4HF, bf16 BitNet)."""
    from bitllm.pack import pack_checkpoint

    out = pack_checkpoint(model, output, method=method, format=format, input_norm=input_norm, skip=tuple(skip),
                          linear_class=linear_class)
    console.print(f"[green]wrote[/green] {out}")


@app.command()
def train(
    preset: Optional[str] = typer.Option(None, help="tiny | demo | small | 700m | 1.3b | 3b | 3.9b (default demo)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A TrainConfig as JSON or YAML."),
    quant: Optional[str] = typer.Option(None, help="ternary | binary | none (the full-precision twin)."),
    layout: Optional[str] = typer.Option(None, help="bitnet (BitNetForCausalLM) | llama (LlamaForCausalLM)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output directory (output_dir)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: --set recipe.lr=2e-3 --set data.train='[\"my.txt\"]'."),
    resume: bool = typer.Option(False, help="Continue bit-exactly from OUTPUT/checkpoint if it exists."),
    overwrite: bool = typer.Option(False, help="Start again over an existing run in OUTPUT."),
) -> None:
    """Train a 1.58-bit, 1-bit or full-precision decoder from scratch (one CPU, a GPU, or `accelerate launch`)."""
    from bitllm.train.config import parse_override, resolve_config
    from bitllm.train.trainer import train as run_training

    overrides = dict(parse_override(s) for s in set_)
    if output is not None:
        overrides["output_dir"] = str(output)
    if steps is not None:
        overrides["steps"] = steps
    cfg = resolve_config(preset, config, quant, layout, overrides)
    result = run_training(cfg, resume=resume, overwrite=overwrite)
    if not result.is_main_process:
        return
    ppl = ", ".join(f"{k} {v:.2f} (unigram {result.unigram_ppl.get(k, float('nan')):.2f})" for k, v in result.heldout_ppl.items())
    console.print(f"[green]trained[/green] {result.model_dir}  held-out perplexity: {ppl}")


@app.command()
def convert(
    model: str = typer.Argument(..., help="Teacher: HF model directory, hub id, or a .gguf file (dequantized by transformers)."),
    method: str = typer.Option("onebit", help="onebit (W1A16: SVID init + distillation) | qat (BitNet b1.58 with λ warm-up)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output directory: model/, checkpoint/, report.json/.md, loss.png."),
    data: list[str] = typer.Option(["bundled"], "--data", help="Training text: FILE | DIR | hf:NAME | bundled (repeatable), or teacher:N (N sequences sampled from the teacher)."),
    eval_data: list[str] = typer.Option([], "--eval-data", help="Held-out text sources (default: the held-out tails of --data; bundled for teacher:N)."),
    steps: int = typer.Option(1000, help="Optimizer steps."),
    batch_size: int = typer.Option(8, help="Sequences per step (over all processes)."),
    micro_batch_size: Optional[int] = typer.Option(None, help="Sequences per forward pass (gradient accumulation)."),
    seq_len: int = typer.Option(256, help="Tokens per sequence."),
    max_eval_tokens: int = typer.Option(16384, help="Held-out tokens scored per split (teacher and student)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default 4e-4 onebit, 1e-4 qat)."),
    warmup_steps: Optional[int] = typer.Option(None, help="LR warm-up steps (default min(500, steps/10)); cosine after."),
    distill: bool = typer.Option(True, help="Distil from the teacher (KL + hidden-state MSE); --no-distill: plain CE."),
    svid: bool = typer.Option(True, help="onebit: SVID init of g, h; --no-svid: g=1, h=mean|W|."),
    kd_scale: float = typer.Option(0.01, help="s: weight of KL(teacher||student) (batchmean)."),
    kd_beta: float = typer.Option(1.0, help="β: weight of the normalised hidden-state MSE (0 = off)."),
    lambda_warmup: Optional[int] = typer.Option(None, help="qat: steps for λ to rise linearly 0→1 (default min(1000, steps/5))."),
    freeze_embeddings: bool = typer.Option(False, help="Keep the token embeddings (and a tied lm_head) frozen."),
    teacher_dtype: str = typer.Option("auto", help="auto (bf16 on a GPU or a CPU with native bf16, else fp32) | bf16 | "
                                      "fp16 | fp32 (the student is always fp32 latent weights)."),
    save_every: int = typer.Option(200, help="Atomic checkpoint every N steps (and at the end)."),
    resume: bool = typer.Option(False, help="Continue bit-exactly from OUTPUT/checkpoint if it exists."),
    overwrite: bool = typer.Option(False, help="Start again over an existing run in OUTPUT."),
    zero_shot: list[str] = typer.Option([], help="Afterwards, score teacher and student on these lm-eval tasks "
                                        "('local' = the offline tasks) and report the share of the teacher's "
                                        "score above chance kept (with --resume on a finished run: only that)."),
    zero_shot_limit: Optional[float] = typer.Option(None, help="lm-eval --limit for --zero-shot (docs per task)."),
) -> None:
    """Convert a pretrained causal LM to 1 bit (OneBit) or 1.58 bits (BitNet QAT) by distillation from itself."""
    from bitllm.convert import convert as run_convert

    result = run_convert(
        model, method, output, resume=resume, overwrite=overwrite, data=list(data), eval_data=list(eval_data) or None,
        steps=steps, batch_size=batch_size, micro_batch_size=micro_batch_size, seq_len=seq_len,
        max_eval_tokens=max_eval_tokens, lr=lr,
        warmup_steps=warmup_steps, distill=distill, svid=svid, kd_scale=kd_scale, kd_beta=kd_beta,
        lambda_warmup=lambda_warmup, freeze_embeddings=freeze_embeddings, teacher_dtype=teacher_dtype,
        save_every=save_every,
    )
    if not result.is_main_process:
        return
    ppl = ", ".join(f"{k} teacher {result.teacher_ppl.get(k, float('nan')):.2f} -> student {v:.2f}"
                    for k, v in result.student_ppl.items())
    console.print(f"[green]converted[/green] {result.model_dir}  held-out perplexity: {ppl}  (report: {output / 'report.md'})")
    if zero_shot:
        from bitllm.convert.zero_shot import run_zero_shot

        tasks = [t for item in zero_shot for t in item.split(",") if t]
        z = run_zero_shot(output, model, tasks, limit=zero_shot_limit)
        share = "n/a" if z["share_kept"] is None else f"{z['share_kept']:.2f}"
        console.print(f"zero-shot average acc: teacher {z['teacher_avg']:.3f}, student {z['student_avg']:.3f}, chance "
                      f"{z['chance_avg']:.3f}; share of the teacher's score above chance kept: {share} "
                      f"(goal {z['goal']:.2f})")


@app.command()
def demo(
    output: Path = typer.Option(Path("runs/demo"), "--output", "-o", help="Where the demo writes its files."),
    minutes: float = typer.Option(6.0, help="Time budget for the whole demo; both models get the same steps."),
) -> None:
    """Train a 1.58-bit model and its full-precision twin from scratch on the bundled corpus and compare them."""
    from bitllm.demo import run_demo

    run_demo(output, minutes=minutes)


@app.command("export")
def export(
    model: str = typer.Argument(..., help="bitllm ternary checkpoint: local directory or hub id."),
    gguf: str = typer.Option("tq2_0", "--gguf", help="tq2_0 | tq1_0 | f16"),
    output: Path = typer.Option(..., "--output", "-o", help="The .gguf file to write (atomically)."),
    embed_type: str = typer.Option("f16", help="Token embedding type: f16 | f32 | q8_0."),
    head_type: Optional[str] = typer.Option(None, help="LM head type (untied heads): f16 | f32 | q8_0; default embed-type."),
) -> None:
    """Export a ternary model as a GGUF file that llama.cpp, LM Studio and llamafile run."""
    from bitllm.formats.gguf_io import export_gguf

    out = export_gguf(model, output, gguf, embed_type=embed_type, head_type=head_type)
    console.print(f"[green]wrote[/green] {out} ({out.stat().st_size:,} bytes)")


@app.command("import")
def import_(
    file: Path = typer.Argument(..., help="A llama/bitnet GGUF file with TQ1_0, TQ2_0 or F16/F32 ternary weights."),
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint directory to write (atomically)."),
    format: str = typer.Option("i2", "--format", "-f", help="i2 | t1"),
) -> None:
    """Import a ternary GGUF file as a bitllm checkpoint (exact for ternary data)."""
    from bitllm.formats.gguf_io import import_gguf

    out = import_gguf(file, output, format)
    console.print(f"[green]wrote[/green] {out}")


@app.command()
def run(
    model: str = typer.Argument(..., help="Packed model: local directory or hub id."),
    prompt: str = typer.Argument(..., help="Prompt text (with --ids: comma-separated token ids); '-' reads it from stdin."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, help="Sample among the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    repetition_penalty: float = typer.Option(1.0, help="> 1 discourages repeats."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="CPU threads (default: all)."),
    head: str = typer.Option("f16", help="LM head precision: f16 | i8 (int8 per row)."),
    kv_dtype: str = typer.Option("f32", "--kv-dtype", help="KV cache precision in the native engine: f32 | f16 (half the memory)."),
    ids: bool = typer.Option(False, "--ids", help="PROMPT is comma-separated token ids (models without a tokenizer)."),
) -> None:
    """Stream the continuation of PROMPT, then print prefill and decode speed (Ctrl-C stops it, speed still printed)."""
    from bitllm.engine import LLM

    if prompt == "-":
        prompt = sys.stdin.read().rstrip("\n")  # the final newline of `echo` or a file is not part of the prompt
        if not prompt.strip():
            raise BitLLMError("PROMPT is '-' but stdin held no prompt")
    if ids:
        try:
            p = [int(x) for x in prompt.split(",") if x.strip()]
        except ValueError:
            raise BitLLMError(f"--ids: PROMPT must be comma-separated integers (e.g. 1,415,2936), got {prompt!r}") from None
    else:
        p = prompt
    llm = LLM(model, threads=threads, head=head, kv_dtype=kv_dtype, verbose=True)
    pieces = llm.stream(p, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        repetition_penalty=repetition_penalty, seed=seed)
    interrupted = False
    try:
        for piece in pieces:
            sys.stdout.write(piece if isinstance(piece, str) else f"{piece} ")
            sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
        sys.stdout.write(" [interrupted]")
    finally:
        pieces.close()  # frees the sequence and records last_stats, wherever the interrupt landed
    sys.stdout.write("\n")
    s = llm.last_stats
    rate = lambda n, t: n / t if t > 0 else float("nan")  # noqa: E731
    console.print(f"[dim]{llm.backend_name} backend, {llm.threads} thread(s): prefill {s['prefill_tokens']} tokens "
                  f"{rate(s['prefill_tokens'], s['prefill_s']):.1f} tok/s, decode {s['decode_tokens']} tokens "
                  f"{rate(s['decode_tokens'], s['decode_s']):.1f} tok/s[/dim]")
    if interrupted:
        raise typer.Exit(130)  # the shell's code for Ctrl-C


@app.command()
def chat(
    model: str = typer.Argument(..., help="Packed model with a tokenizer: local directory or hub id."),
    system: Optional[str] = typer.Option(None, help="System message."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", help="Tokens per answer at most."),
    temperature: float = typer.Option(0.7, help="0 = greedy."),
    top_p: float = typer.Option(0.9, help="Nucleus sampling mass."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="CPU threads (default: all)."),
    head: str = typer.Option("f16", help="LM head precision: f16 | i8."),
    kv_dtype: str = typer.Option("f32", "--kv-dtype", help="KV cache precision in the native engine: f32 | f16 (half the memory)."),
) -> None:
    """Chat interactively (history kept): /reset clears it, /exit or Ctrl-D quits, Ctrl-C stops an answer."""
    from bitllm.engine import LLM, SamplingParams

    SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)  # bad settings: fail now
    llm = LLM(model, threads=threads, head=head, kv_dtype=kv_dtype, verbose=True)
    if llm.tokenizer is None:
        raise BitLLMError(f"{model} has no tokenizer, which chat needs (use `bitllm run --ids` with token ids)")
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    console.print("[dim]/reset clears the history, /exit quits[/dim]")
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            continue
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            history = list(start)
            console.print("[dim](history cleared)[/dim]")
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": line})
        reply = ""
        try:
            for piece in llm.chat(history, stream=True, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p):
                reply += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [interrupted]")
        except BitLLMError as e:  # e.g. a message longer than the context: drop this turn, keep the session
            sys.stdout.write("\n")
            console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
            history.pop()
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply})


@app.command()
def serve(
    model: str = typer.Argument(..., help="bitllm checkpoint: local directory or hub id (needs a tokenizer)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; loopback unless you mean otherwise."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key: Optional[str] = typer.Option(None, envvar="BITLLM_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on every endpoint but /health and the chat page."),
    model_name: Optional[str] = typer.Option(None, help="Model id in /v1/models and responses (default: the directory name)."),
    threads: Optional[int] = typer.Option(None, help="Engine threads (default: every CPU this process may use)."),
    max_batch: int = typer.Option(16, help="Most sequences decoded together in one engine step."),
    max_queue: int = typer.Option(64, help="Most requests waiting to join the batch; beyond it, 429 with Retry-After."),
    timeout: float = typer.Option(300.0, help="Seconds a request may take from arrival to its last token (then 504)."),
    max_tokens: int = typer.Option(1024, help="Largest max_tokens a request may ask for."),
    max_prompt_tokens: Optional[int] = typer.Option(None, help="Longest prompt in tokens (default: the model's context - 1)."),
    max_body_bytes: int = typer.Option(1 << 20, help="Largest request body in bytes (then 413)."),
    head: str = typer.Option("f16", help="LM head precision in the native engine: f16 | i8."),
    kv_dtype: str = typer.Option("f32", "--kv-dtype", help="KV cache precision in the native engine: f32 | f16 (half the memory)."),
    cors_origin: list[str] = typer.Option([], "--cors-origin", help="Let web pages from ORIGIN (e.g. http://localhost:3000; '*' = any) call the API (CORS). Repeatable; off by default."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming) with a chat page at /."""
    from bitllm.engine.llm import LLM
    from bitllm.serve import ServeConfig
    from bitllm.serve import serve as run_server

    llm = LLM(model, threads=threads, head=head, kv_dtype=kv_dtype, verbose=True)
    name = model_name or Path(str(model).rstrip("/")).name
    cfg = ServeConfig(model_name=name, api_key=api_key, max_batch=max_batch, max_queue=max_queue, timeout=timeout,
                      max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes,
                      cors_origins=tuple(cors_origin))
    console.print(f"[green]serving[/green] {name} on http://{host}:{port}  (chat page at /, API at /v1)")
    run_server(llm, host=host, port=port, config=cfg)


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="bitllm checkpoint or HF model directory (or hub id), or a .gguf file."),
    ppl: list[str] = typer.Option([], "--ppl", help="Perplexity source: bundled | FILE.txt/.jsonl | DIR | hf:NAME[:CONFIG[:SPLIT]] | wikitext2. Repeatable."),
    context: Optional[int] = typer.Option(None, help="Perplexity window in tokens (default: the model's context)."),
    stride: Optional[int] = typer.Option(None, help="Perplexity stride in tokens (default: the window, disjoint)."),
    max_tokens: int = typer.Option(16384, help="Score at most this many tokens per split."),
    tasks: list[str] = typer.Option([], "--tasks", "-t", help="lm-eval tasks (comma-separated or repeated); 'local' = the offline tasks."),
    include_path: Optional[str] = typer.Option(None, help="lm-eval --include_path (local tasks are built on first use otherwise)."),
    limit: Optional[float] = typer.Option(None, help="lm-eval --limit: docs per task (or a fraction)."),
    num_fewshot: Optional[int] = typer.Option(None, help="lm-eval --num_fewshot."),
    lm_eval_arg: list[str] = typer.Option([], "--lm-eval-arg", help="Any further lm_eval.simple_evaluate argument, KEY=VALUE (JSON values parse)."),
    model_type: str = typer.Option("bitllm", help="lm-eval model: bitllm (this adapter) | hf (lm-eval's transformers model)."),
    backend: str = typer.Option("auto", help="auto | native | hf | llama.cpp | transformers (GGUF)."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer directory or hub id (e.g. for a GGUF)."),
    threads: Optional[int] = typer.Option(None, help="Threads (default: every CPU this process may use)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Directory for eval.json, eval.md and plots."),
) -> None:
    """Perplexity (sliding window) and zero-shot accuracy (lm-eval) of a 1-bit model, an fp twin or a GGUF."""
    from bitllm.eval.runner import evaluate, parse_kv

    task_list = [t for item in tasks for t in item.split(",") if t]
    if not ppl and not task_list:
        raise BitLLMError("nothing to do: give --ppl SOURCE and/or --tasks TASKS (e.g. --ppl bundled --tasks local)")
    from bitllm.eval.report import ppl_markdown, zeroshot_markdown

    res = evaluate(model, ppl=ppl, tasks=task_list, context=context, stride=stride, max_tokens=max_tokens,
                   backend=backend, threads=threads, tokenizer=tokenizer, include_path=include_path, limit=limit,
                   num_fewshot=num_fewshot, model_type=model_type, lm_eval_kwargs=parse_kv(lm_eval_arg),
                   output=output, log=lambda s: console.print(s))
    if res["perplexity"]:
        print(ppl_markdown(res["perplexity"]))
    if res["zeroshot"]:
        print(zeroshot_markdown(res["zeroshot"]))


@app.command()
def bench(
    model: str = typer.Argument(..., help="bitllm checkpoint directory."),
    baseline: list[str] = typer.Option([], "--baseline", "-b", help="fp | llama.cpp (repeatable), measured in the same run."),
    fp_model: Optional[str] = typer.Option(None, help="The fp twin/teacher for --baseline fp (default: a same-shape random fp twin)."),
    fp_dtype: str = typer.Option("float32", help="dtype of the generated fp twin: float32 | bfloat16."),
    prompt_tokens: int = typer.Option(128, help="Prompt length for prefill and decode."),
    gen_tokens: int = typer.Option(32, help="Tokens decoded per repetition."),
    reps: int = typer.Option(5, help="Repetitions after a warm-up (median and min are reported)."),
    batch_sizes: str = typer.Option("1,4,16", help="Batch sizes for throughput through LLM.batch()."),
    threads: Optional[int] = typer.Option(None, help="Threads (default: every CPU this process may use)."),
    watts_per_core: float = typer.Option(4.0, help="Assumed W per busy core for the energy ESTIMATE when RAPL is unreadable."),
    output: Path = typer.Option(Path("bench-results"), "--output", "-o", help="Directory for bench.json, bench.md, bench.png."),
) -> None:
    """Size, memory, prefill/decode speed, latency percentiles, batched throughput and energy, vs baselines."""
    from bitllm.eval.bench import BenchConfig, run_bench
    from bitllm.eval.report import bench_markdown, write_bench_report

    cfg = BenchConfig(prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, reps=reps, threads=threads,
                      batch_sizes=tuple(int(b) for b in batch_sizes.split(",") if b), watts_per_core=watts_per_core)
    res = run_bench(model, baseline, fp_model=fp_model, fp_dtype=fp_dtype, cfg=cfg, workdir=output / "work",
                    progress=lambda s: console.print(s)).as_dict()
    paths = write_bench_report(res, output)
    print(bench_markdown(res))
    console.print(f"[green]wrote[/green] {', '.join(str(p) for p in paths.values())}")


def main() -> None:
    try:
        app()
    except BitLLMError as e:  # one line, the message taken literally (no rich markup, no wrapping)
        console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
