"""``python -m infer transcribe`` as a subprocess: options, manifest jobs that resume, failures reported last."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile

from tests.support import speech
from tests.test_asr import cached_small_checkpoint

REPO = Path(__file__).resolve().parent.parent
ISSUE_OPTIONS = ("--model", "--language", "--context", "--batch-size", "--max-new-tokens", "--format",
                 "--output", "--manifest")  # fmt: skip


def run_cli(args: list[str], compile_cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    if compile_cache is not None:
        # Later runs reuse the first run's compiled programs.
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(compile_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"
        )
    return subprocess.run(
        [sys.executable, "-m", "infer", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_help_explains_every_option():
    result = run_cli(["transcribe", "--help"])
    assert result.returncode == 0
    for option in (*ISSUE_OPTIONS, "FILE", "--timestamps", "--repetition-penalty", "--no-repeat-ngram-size"):
        assert option in result.stdout
    assert "rerun skips" in result.stdout and "exit status" in result.stdout
    top = run_cli(["--help"])
    assert top.returncode == 0 and "transcribe" in top.stdout and "align" in top.stdout
    assert run_cli(["recognise"]).returncode == 2


def test_bad_arguments_exit_2(tmp_path):
    assert run_cli(["transcribe", "--model", str(tmp_path)]).returncode == 2  # no audio named
    both = run_cli(["transcribe", "a.wav", "--manifest", "m.txt", "--model", str(tmp_path)])
    assert both.returncode == 2 and "either" in both.stderr
    language = run_cli(["transcribe", "a.wav", "--language", "Klingon", "--model", str(tmp_path)])
    assert language.returncode == 2 and "Klingon" in language.stderr


def test_manifest_job_resumes_and_reports_failures_last(tmp_path):
    checkpoint = cached_small_checkpoint()
    cache = tmp_path / "jax-cache"
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    soundfile.write(audio_dir / "hi.wav", speech.synth(speech.SHORT_EN), 16000)
    soundfile.write(audio_dir / "fox.flac", speech.synth(speech.MEDIUM_EN)[: 3 * 16000], 16000)
    (audio_dir / "notes.wav").write_text("not audio")
    manifest = tmp_path / "job.txt"
    manifest.write_text(
        "\n".join([
            "audio/hi.wav",
            json.dumps({"id": "fox", "path": "audio/fox.flac", "context": "Topic: foxes."}),
            json.dumps({"id": "gone", "path": "audio/missing.wav"}),
            "# a comment",
            "audio/notes.wav",
        ])
        + "\n"
    )  # fmt: skip
    common = ["--model", checkpoint, "--batch-size", "2", "--max-new-tokens", "4"]

    first = run_cli(["transcribe", "--manifest", str(manifest), *common], cache)
    assert first.returncode == 1
    results = tmp_path / "job.txt.results.jsonl"
    records = read_jsonl(results)
    assert sorted(r["id"] for r in records) == ["audio/hi.wav", "fox"]
    assert all(r["truncated"] and r["text"] and "error" not in r for r in records)
    for record in records:  # the budget of 4 tokens ends every item
        [segment] = record["segments"]
        assert record["finish_reason"] == segment["finish_reason"] == "length"
        assert len(segment["token_ids"]) == len(segment["logprobs"]) == 4
        assert record["avg_logprob"] == segment["avg_logprob"] == pytest.approx(sum(segment["logprobs"]) / 4)
        assert all(p < 0 for p in segment["logprobs"]) and record["compression_ratio"] > 0
    errors = [line for line in first.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "gone" in errors[0] + errors[1] and "audio/notes.wav" in errors[0] + errors[1]
    assert first.stderr.rstrip().endswith("2 item(s) failed")  # after everything else
    assert "file" in first.stderr and "audio" in first.stderr  # the progress bar

    again = run_cli(["transcribe", "--manifest", str(manifest), *common, "--no-progress"], cache)
    assert again.returncode == 1
    assert "skipping 2 item(s)" in again.stderr
    assert read_jsonl(results) == records  # nothing written twice; failures are retried, not recorded

    # FILE mode on the same audio, with the manifest's context for both: the same texts, in input order.
    output = tmp_path / "out.json"
    files = run_cli(
        ["transcribe", str(audio_dir / "hi.wav"), str(audio_dir / "fox.flac"), *common,
         "--context", "Topic: foxes.", "--format", "json", "--output", str(output), "--no-progress"],
        cache,
    )  # fmt: skip
    assert files.returncode == 0, files.stderr
    listed = json.loads(output.read_text(encoding="utf-8"))
    by_id = {r["id"]: r for r in records}
    assert [r["text"] for r in listed][1] == by_id["fox"]["text"]
    assert listed[1]["segments"][0]["token_ids"] == by_id["fox"]["segments"][0]["token_ids"]
    assert listed[1]["avg_logprob"] == pytest.approx(by_id["fox"]["avg_logprob"], abs=1e-5)
    assert [r["id"] for r in listed] == [str(audio_dir / "hi.wav"), str(audio_dir / "fox.flac")]
    assert "warning:" in files.stderr  # truncated items are warned about


def test_file_mode_runs_stdin_and_files_as_one_job_in_argument_order(tmp_path):
    """FILEs are planned as a manifest is (longest first, stdin's unknown length last), yet written in the order
    of the arguments; stdin's audio gives the text of the same file named by path, and a missing file fails
    alone, reported last."""
    checkpoint = cached_small_checkpoint()
    hi, fox, missing = tmp_path / "hi.wav", tmp_path / "fox.flac", tmp_path / "missing.wav"
    soundfile.write(hi, speech.synth(speech.SHORT_EN), 16000)
    soundfile.write(fox, speech.synth(speech.MEDIUM_EN)[: 3 * 16000], 16000)
    args = ["transcribe", str(hi), "-", str(missing), str(fox), "--model", checkpoint, "--batch-size", "2",
            "--max-new-tokens", "4", "--format", "jsonl", "--no-progress"]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-m", "infer", *args], cwd=REPO, env=env, input=fox.read_bytes(),
                            capture_output=True, timeout=600)  # fmt: skip
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [r["id"] for r in records] == [str(hi), "-", str(missing), str(fox)]
    piped, absent, named = records[1], records[2], records[3]
    assert piped["text"] and piped["text"] == named["text"] and piped["language"] == named["language"]
    assert piped["segments"][0]["token_ids"] == named["segments"][0]["token_ids"]
    assert absent["finish_reason"] == "error" and "missing.wav" in absent["error"] and not absent["text"]
    assert records[0]["text"] and "error" not in records[0]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {missing}: AudioFileNotFoundError: {missing}: no such audio file"]
    assert stderr.rstrip().endswith("1 item(s) failed")


FILTER_SENTENCES = ["Hi.", "Good morning to you.", "The cat sat on the mat.", "Seven green apples.",
                    "Please call me back tomorrow.", "Where is the station?"]  # fmt: skip


def test_manifest_filters_send_items_that_fail_them_to_the_rejected_file(tmp_path):
    """Thresholds chosen from the items' measured values split a manifest: the items below the log-probability
    minimum or above the compression-ratio maximum go to the rejected file with their reasons and values, the
    others to the output, each item to exactly one of them; a rerun skips both."""
    checkpoint = cached_small_checkpoint()
    cache = tmp_path / "jax-cache"
    lines = []
    for k, sentence in enumerate(FILTER_SENTENCES):
        soundfile.write(tmp_path / f"clip{k}.wav", speech.synth(sentence, speed=150 + 10 * k), 16000)
        lines.append(json.dumps({"id": f"item-{k}", "path": f"clip{k}.wav"}))
    manifest = tmp_path / "job.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    common = ["--model", checkpoint, "--batch-size", "4", "--max-new-tokens", "6", "--no-progress"]

    # The values each item measures, from a run without filters (the same plan, so the same numbers).
    measured_path = tmp_path / "measured.jsonl"
    measured = run_cli(
        ["transcribe", "--manifest", str(manifest), *common, "--output", str(measured_path)], cache
    )
    assert measured.returncode == 0, measured.stderr
    values = {r["id"]: r for r in read_jsonl(measured_path)}
    assert sorted(values) == [f"item-{k}" for k in range(len(FILTER_SENTENCES))]
    logprobs = sorted(r["avg_logprob"] for r in values.values())
    ratios = sorted(r["compression_ratio"] for r in values.values())
    distinct = sorted(set(ratios))
    assert len(set(logprobs)) == len(logprobs) and len(distinct) >= 2
    min_logprob = (logprobs[1] + logprobs[2]) / 2  # the two lowest fail it
    max_ratio = (distinct[-1] + distinct[-2]) / 2  # the highest (and those equal to it) fail it
    low = {i for i, r in values.items() if r["avg_logprob"] < min_logprob}
    high = {i for i, r in values.items() if r["compression_ratio"] > max_ratio}
    assert len(low) == 2 and len(high) == ratios.count(distinct[-1]) >= 1
    assert 0 < len(low | high) < len(values)  # some items go each way

    output = tmp_path / "kept.jsonl"
    args = ["transcribe", "--manifest", str(manifest), *common, "--output", str(output),
            "--min-avg-logprob", repr(min_logprob), "--max-compression-ratio", repr(max_ratio)]  # fmt: skip
    filtered = run_cli(args, cache)
    assert filtered.returncode == 0, filtered.stderr
    rejected_path = tmp_path / "kept.rejected.jsonl"  # the default: beside the output
    kept, rejected = read_jsonl(output), read_jsonl(rejected_path)
    assert f"{len(low | high)} item(s) failed the filters and went to {rejected_path}" in filtered.stderr
    # Every item in exactly one of the two files.
    assert len(kept) + len(rejected) == len(FILTER_SENTENCES)
    assert sorted([r["id"] for r in kept] + [r["id"] for r in rejected]) == sorted(values)
    assert {r["id"] for r in rejected} == low | high and len(rejected) == len(low | high)
    for record in kept:
        assert record == values[record["id"]]
    for record in rejected:
        reasons = record.pop("rejected")
        assert record == values[record["id"]]
        expected = []
        if record["id"] in low:
            expected.append(
                {"filter": "min_avg_logprob", "threshold": min_logprob, "value": record["avg_logprob"]}
            )
        if record["id"] in high:
            expected.append(
                {
                    "filter": "max_compression_ratio",
                    "threshold": max_ratio,
                    "value": record["compression_ratio"],
                }
            )
        assert reasons == expected

    # A rerun finds every item done, in one file or the other, and writes nothing.
    again = run_cli(args, cache)
    assert again.returncode == 0 and f"skipping {len(FILTER_SENTENCES)} item(s)" in again.stderr
    assert read_jsonl(output) == kept and len(read_jsonl(rejected_path)) == len(rejected)


def test_bad_filter_values_are_refused_before_anything_runs(tmp_path):
    manifest = tmp_path / "job.txt"
    manifest.write_text("a.wav\n")
    base = ["transcribe", "--manifest", str(manifest), "--model", str(tmp_path)]
    cases = {
        "0.5": ("--min-avg-logprob", "--min-avg-logprob must be a finite log-probability ≤ 0, got 0.5"),
        "nan": ("--min-avg-logprob", "--min-avg-logprob must be a finite log-probability ≤ 0, got nan"),
        "0": ("--max-compression-ratio", "--max-compression-ratio must be a finite number > 0, got 0.0"),
        "inf": ("--max-compression-ratio", "--max-compression-ratio must be a finite number > 0, got inf"),
        "high": ("--max-compression-ratio", "argument --max-compression-ratio: invalid float value: 'high'"),
    }
    for value, (option, message) in cases.items():
        result = run_cli([*base, option, value])
        assert result.returncode == 2 and message in result.stderr, (value, result.stderr)
    files = run_cli(["transcribe", "a.wav", "--min-avg-logprob", "-1", "--model", str(tmp_path)])
    assert files.returncode == 2 and "filter a manifest job" in files.stderr
    lonely = run_cli([*base, "--rejected", str(tmp_path / "r.jsonl")])
    assert lonely.returncode == 2 and "--rejected needs a filter" in lonely.stderr
    same = run_cli([*base, "--min-avg-logprob", "-1", "--output", "x.jsonl", "--rejected", "x.jsonl"])
    assert same.returncode == 2 and "another file than the output" in same.stderr
