"""The adapter learning demo (``python -m train.adapt_demo``) end to end at a tiny scale: a domain of distorted voices
synthesised with ``train.synth --voices``, two training steps per method, four test utterances; its table's
numbers checked against what the runs left on disk."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from train import adapt_demo, synth

REPO = Path(__file__).resolve().parent.parent
# The demo recipe's kept ASR stage (the shipped demo model's export), in the repository.
BASE = REPO / "train" / "stages" / "asr_voices"
DISTORTED = ["croak", "kaukovalta", "Tweaky"]


def test_synth_voices_option_voices_every_split_with_the_chosen_variants(tmp_path: Path) -> None:
    plans = {
        split: synth.plan_split(split, 12, 1, ["English", "German"], variants=DISTORTED)
        for split in synth.SPLITS
    }
    for split, split_plans in plans.items():
        assert {p.voice.split("+")[1] for p in split_plans} <= set(DISTORTED), split
        assert all(synth.sentence_split(p.language, p.text) == split for p in split_plans)
    # Every variant the option offers is in no split of the demo data.
    heard = {v for names in synth.VARIANTS.values() for v in names}
    assert not heard & set(synth.UNHEARD_VARIANTS)
    # Without the option, a split keeps its own variants (and its plans, draw for draw).
    default = synth.plan_split("test", 12, 1, ["English", "German"])
    assert {p.voice.split("+")[1] for p in default} <= set(synth.VARIANTS["test"])
    assert [p.text for p in default] == [p.text for p in plans["test"]]
    with pytest.raises(SystemExit):
        synth.main(
            ["--out", str(tmp_path), "--train", "0", "--val", "0", "--test", "1", "--voices", "robosoft,nope"]
        )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("adapt_demo")
    domain = root / "domain"
    for split, count in (("train", 8), ("test", 4)):
        synth.write_split(domain, split, count, seed=1, languages=["English", "German"], variants=DISTORTED)
    base_test = synth.write_split(root / "base", "test", 4, seed=0, languages=["English", "German"])
    out, report = root / "runs", root / "adapt_demo.json"
    code = adapt_demo.main(["--base", str(BASE), "--domain", str(domain), "--base-test", str(base_test),
                            "--out", str(out), "--json", str(report), "--smoke"])  # fmt: skip
    assert code == 0
    return out, json.loads(report.read_text(encoding="utf-8"))


def _elements(path: Path) -> int:
    return sum(math.prod(t.shape) for t in load_file(str(path)).values())


@pytest.mark.slow
def test_adapt_demo_table_counts_what_the_runs_trained(smoke_run: tuple[Path, dict]) -> None:
    out, report = smoke_run
    entries = {e["key"]: e for e in report["entries"]}
    assert list(entries) == ["base", "full", "lora8", "lora32"]
    # Trainable parameters: the adapter files' tensors (LoRA) and the exported model's (full fine-tuning).
    for key in ("lora8", "lora32"):
        assert entries[key]["trainable_params"] == _elements(
            out / key / "export" / "adapter_model.safetensors"
        )
    # The released layout writes the tied head beside the embedding: one trained tensor, counted once.
    exported = load_file(str(out / "full" / "export" / "model.safetensors"))
    head, embedding = exported.pop("thinker.lm_head.weight"), exported["thinker.model.embed_tokens.weight"]
    assert np.array_equal(head, embedding)
    assert entries["full"]["trainable_params"] == sum(math.prod(t.shape) for t in exported.values())
    # LoRA's count is linear in the rank.
    assert entries["lora32"]["trainable_params"] == 4 * entries["lora8"]["trainable_params"]
    for key in ("full", "lora8", "lora32"):
        entry = entries[key]
        records = [json.loads(line) for line in (out / key / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r["kind"] == "train"]
        assert [r["step"] for r in train] == [1, 2] and entry["steps"] == 2 and entry["batch_size"] == 4
        assert entry["step_seconds_median"] == pytest.approx(train[1]["time"] - train[0]["time"])
        assert entry["train_loss_tail"] == pytest.approx(train[-1]["loss"])
        # The training process held at least its model and far less than the machine.
        assert 2 * (BASE / "model.safetensors").stat().st_size < entry["peak_rss_bytes"] < 64 * 2**30
        assert entry["load_average"] > 0
        assert entry["domain"]["utterances"] == entry["base"]["utterances"] == 4
    # The printed table is made of these numbers.
    for entry in report["entries"][1:]:
        line = next(row for row in report["table"].splitlines() if row.startswith(f"| {entry['name']} |"))
        assert f"{entry['trainable_params']:,}" in line and f"{entry['domain']['wer']:.2%}" in line


def test_adapt_demo_adapter_evaluation_equals_the_merged_model(smoke_run: tuple[Path, dict]) -> None:
    """The LoRA rows' WER come from base + adapter: the same texts as the adapter merged into the base weights."""
    from qasr_jax import adapters as lora
    from qasr_jax import weights
    from qasr_jax.asr import Qwen3ASRModel
    from train import demo_eval

    out, report = smoke_run
    entry = next(e for e in report["entries"] if e["key"] == "lora32")
    model = Qwen3ASRModel.from_pretrained(BASE, weights_cache=False)
    adapter = lora.load_peft(out / "lora32" / "export", model.config)
    # lora_b starts at zero: the two steps moved it
    assert max(float(np.abs(np.asarray(b)).max()) for b in _lora_b(adapter.weights)) > 0
    merged = lora.merge_adapter(model.params, adapter.weights)  # the scale is folded into lora_b
    merged_dir = weights.export_pretrained(out / "merged", model.config, merged, BASE, "float32")
    rows = demo_eval.read_rows(report["domain_test"], 4)
    merged_report = demo_eval.asr_report(Qwen3ASRModel.from_pretrained(merged_dir, weights_cache=False), rows)
    assert merged_report["wer"] == entry["domain"]["wer"]


def _lora_b(tree: dict) -> list:
    found = []
    for key, value in tree.items():
        if key == "lora_b":
            found.append(value)
        elif isinstance(value, dict):
            found += _lora_b(value)
    return found
