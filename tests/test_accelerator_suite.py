"""The accelerator suite runs every section on the CPU with ``--tiny``, so it cannot rot before a GPU or TPU
host runs it for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import accelerator_suite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, str]:
    out = tmp_path_factory.mktemp("suite")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "QASR_COMPILATION_CACHE": "off"}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.accelerator_suite", "--tiny", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return done, report, (out / "report.md").read_text(encoding="utf-8")


def test_tiny_suite_prints_the_hardware_and_runs_every_section(tiny_run):
    done, report, _ = tiny_run
    assert done.stdout.startswith("hardware: 1 × cpu (cpu)")
    assert report["tiny"] is True
    assert report["hardware"]["platform"] == "cpu"
    assert list(report["sections"]) == list(accelerator_suite.SECTIONS)
    for name, entry in report["sections"].items():
        assert entry["status"] == "ok", (name, entry.get("traceback"))
        assert entry["wall_s"] > 0 and entry["peak_host_gb"] > 0


def test_tiny_report_json_holds_every_measurement(tiny_run):
    _, report, _ = tiny_run
    sizes = accelerator_suite.TINY
    results = {name: entry["result"] for name, entry in report["sections"].items()}

    tests = results["kernel_tests"]
    assert tests["mode"] == "interpreted"
    assert tests["passed"] == tests["tests"] >= 2 and tests["failures"] == tests["errors"] == 0

    timing = results["kernel_timing"]
    assert [row["model"] for row in timing["windowed"]] == list(sizes.kernel_models)
    assert [(row["heads"], row["head_dim"]) for row in timing["windowed"]] == [(14, 64), (16, 64)]
    # The 0.6B and 1.7B decoders share one attention shape: timed once, by the kernel too.
    assert [(row["batch"], row["q_heads"], row["kv_heads"], row["head_dim"]) for row in timing["decode"]] == [
        (batch, 16, 8, 128) for batch in sizes.kernel_batches
    ]
    for row in timing["windowed"] + timing["decode"]:
        assert row["xla_ms"] > 0 and row["pallas_ms"] > 0

    encoder = results["encoder"]
    assert (
        encoder["batch"] == sizes.encoder_batch and encoder["audio_s_per_s"] > 0 and encoder["compile_s"] > 0
    )

    decode = results["decode"]["rows"]
    assert [row["batch"] for row in decode] == list(sizes.decode_batches)
    for row in decode:
        assert row["slots"] >= row["batch"] and row["steps"] == sizes.decode_steps and row["step_ms"] > 0

    e2e = results["end_to_end"]
    assert (e2e["batch"], e2e["new_tokens"]) == (sizes.e2e_batch, sizes.e2e_tokens)
    assert e2e["audio_s_per_s"] > 0 and e2e["paper_audio_s_per_s"] == 2000
    assert e2e["tokens_per_s"] * e2e["seconds"] == pytest.approx(sizes.e2e_batch * sizes.e2e_tokens)

    aligner = results["aligner"]
    assert aligner["batch"] == sizes.aligner_batch and aligner["words"] > 0 and aligner["programs"] >= 1
    assert aligner["audio_s_per_s"] > 0 and aligner["paper_audio_s_per_s"] == 1000


def test_tiny_report_markdown_has_every_section_and_the_paper_figures(tiny_run):
    _, _, markdown = tiny_run
    assert markdown.startswith("# Accelerator suite (--tiny)")
    for name in accelerator_suite.SECTIONS:
        assert f"## {name}\n" in markdown
        assert f"| {name} | ok |" in markdown
    assert "about 2,000 audio-s/s" in markdown and "about 1,000 audio-s/s" in markdown
    assert "interpreted (CPU: not a kernel timing)" in markdown


def test_a_failing_section_is_recorded_with_its_traceback():
    report = {"sections": {}}
    with accelerator_suite._section(report, "broken") as entry:
        entry["result"] = {}
        raise ValueError("no such device")
    with accelerator_suite._section(report, "fine") as entry:
        entry["result"] = {"ok": True}
    assert report["sections"]["broken"]["status"] == "failed"
    assert report["sections"]["broken"]["error"] == "ValueError: no such device"
    assert "Traceback" in report["sections"]["broken"]["traceback"]
    assert report["sections"]["fine"]["status"] == "ok"
