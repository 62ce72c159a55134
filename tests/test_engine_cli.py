"""`bitllm run` and `bitllm chat` on a tiny packed model (typer's CliRunner, no subprocess)."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from bitllm.cli import app, main
from test_engine_api import _save, _tokenizer


def test_run_streams_and_reports_speed(tmp_path):
    d = _save(tmp_path / "m")
    r = CliRunner().invoke(app, ["run", str(d), "1,5,9", "--ids", "-n", "5", "-t", "1"])
    assert r.exit_code == 0, r.output
    assert len(r.stdout.split()) >= 5  # five token ids (no tokenizer)
    assert "prefill 3 tokens" in r.output and "tok/s" in r.output and "decode 4 tokens" in r.output


def test_run_with_an_f16_kv_cache(tmp_path):
    d = _save(tmp_path / "m")
    args = ["run", str(d), "1,5,9", "--ids", "-n", "5", "-t", "1"]
    r32, r16 = (CliRunner().invoke(app, args + ["--kv-dtype", dt]) for dt in ("f32", "f16"))
    assert r16.exit_code == 0 and r32.exit_code == 0, r16.output
    assert r16.stdout.split()[:5] == r32.stdout.split()[:5]  # this model's margins exceed fp16's rounding
    bad = CliRunner().invoke(app, args + ["--kv-dtype", "q8"])
    assert bad.exit_code != 0 and "kv_dtype" in str(bad.exception or bad.output)


def test_chat_keeps_history_and_resets(tmp_path):
    d = _save(tmp_path / "m", tokenizer=_tokenizer())
    r = CliRunner().invoke(app, ["chat", str(d), "-n", "4", "-t", "1", "--temperature", "0"],
                           input="hello\n/reset\nbits\n/exit\n")
    assert r.exit_code == 0, r.output
    assert "history cleared" in r.output


def test_run_reports_a_long_prompt_as_an_error(tmp_path):
    d = _save(tmp_path / "m")
    ids = ",".join(str(3 + i % 50) for i in range(200))  # the tiny model's context is 128
    r = CliRunner().invoke(app, ["run", str(d), ids, "--ids", "-n", "2", "-t", "1"])
    assert r.exit_code != 0 and "context is 128" in str(r.exception or r.output)


def test_errors_are_one_literal_line(tmp_path, monkeypatch, capsys):
    """`bitllm` (main) reports a BitLLMError as one line, text taken literally (no rich markup, no wrap)."""
    d = _save(tmp_path / "m")
    bad = str(tmp_path / "no" / "such" / "model[/dir]" / ("long" * 20))
    for argv, want in ([["run", bad, "hi"], f"{bad!r} is neither"],
                       [["run", str(d), "1,x", "--ids"], "comma-separated integers"]):
        monkeypatch.setattr(sys, "argv", ["bitllm", *argv])
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith("error: ") and want in err[-1], err


def test_chat_survives_a_message_longer_than_the_context(tmp_path):
    d = _save(tmp_path / "m", tokenizer=_tokenizer())
    r = CliRunner().invoke(app, ["chat", str(d), "-n", "4", "-t", "1", "--temperature", "0"],
                           input="hello " * 300 + "\nbits\n/exit\n")
    assert r.exit_code == 0, r.output
    assert "context is 128" in r.output and r.output.count("> ") == 3  # the session went on to "bits"


def test_run_reads_the_prompt_from_stdin(tmp_path):
    d = _save(tmp_path / "m", tokenizer=_tokenizer())
    args = ["-n", "5", "-t", "1"]
    direct = CliRunner().invoke(app, ["run", str(d), "the quick", *args])
    piped = CliRunner().invoke(app, ["run", str(d), "-", *args], input="the quick\n")  # as `echo ... |`
    assert direct.exit_code == 0 and piped.exit_code == 0, piped.output
    assert piped.stdout == direct.stdout and "prefill" in piped.output
    ids = CliRunner().invoke(app, ["run", str(d), "-", "--ids", *args], input="1,5,9\n")
    assert ids.exit_code == 0 and "prefill 3 tokens" in ids.output, ids.output
    empty = CliRunner().invoke(app, ["run", str(d), "-", *args], input="")
    assert empty.exit_code != 0 and "stdin" in str(empty.exception or empty.output)


def test_run_interrupted_still_reports_speed(tmp_path, monkeypatch):
    """Ctrl-C (here: during the 4th engine step) stops the stream; what was generated is still measured."""
    from bitllm.engine.llm import NativeBackend

    d = _save(tmp_path / "m")
    forward, calls = NativeBackend.forward, []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return forward(self, *a, **k)

    monkeypatch.setattr(NativeBackend, "forward", interrupted)
    r = CliRunner().invoke(app, ["run", str(d), "1,5,9", "--ids", "-n", "20", "-t", "1"])
    assert r.exit_code == 130, r.output
    assert len(r.stdout.split()) == 4 and "[interrupted]" in r.stdout  # three token ids, then the notice
    assert "prefill 3 tokens" in r.output and "decode 2 tokens" in r.output
