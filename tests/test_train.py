"""Fine-tuning: config, data pipeline, the objective against the official model, sharded steps, overfitting,
kill-and-resume, and export back to the released layout."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qasr_jax import audio as audio_io
from qasr_jax import text as text_io
from qasr_jax.config import config_from_dict, load_config
from qasr_jax.errors import ConfigError
from qasr_jax.training import data as data_lib
from qasr_jax.training import losses
from qasr_jax.training.config import load_train_config
from qasr_jax.training.evaluate import (
    ErrorCounts,
    boundary_shift_ms,
    edit_distance,
    label_words,
    normalize_text,
)
from qasr_jax.training.metrics import read_metrics
from qasr_jax.training.optim import learning_rate_schedule
from qasr_jax.weights import export_pretrained, load_pretrained
from tests.support import speech
from tests.support import train_fixtures as tf
from tests.test_sharding import REPO, run_mesh_check


def _tiny_model_dir(path, aligner: bool = False) -> str:
    return tf.write_model_dir(path, tf.tiny_config_dict(aligner=aligner), aligner=aligner)


def _random_params(config, seed: int = 0):
    from tests.support.mesh_fixtures import random_params

    return random_params(config, seed)


# --------------------------------------------------------------------------------------------------------------
# Config, schedule, metrics


def test_config_reads_toml_applies_overrides_and_names_bad_fields(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(tf.train_toml("model_dir", "train.jsonl", "out"), encoding="utf-8")
    cfg = load_train_config(path, ["optim.learning_rate=2e-4", 'model.freeze=["encoder"]',
                                   'mesh.spec="data=2,tensor=-1"', "mesh.rules.heads=fsdp", "run.steps=7"])  # fmt: skip
    assert cfg.optim.learning_rate == 2e-4
    assert cfg.model.freeze == ("encoder",)
    assert cfg.mesh.spec == "data=2,tensor=-1"
    assert dict(cfg.mesh.rules) == {"heads": "fsdp"}
    assert cfg.run.steps == 7 and cfg.data.batch_size == 4 and cfg.model.init == "random"
    for override, message in (
        ("optim.learning_rat=1", "unknown fields in \\[optim\\]"),
        ("run.objective=ctc", "run.objective = 'ctc'"),
        ("data.batch_size=4.5", "data.batch_size: expected an integer"),
        ("optim.grad_accum=3", "multiple of optim.grad_accum"),
        ('model.freeze=["encoder", "decoder"]', "leaves nothing to train"),
        ("steps=3", "expected section.key=value"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_train_config(path, [override])


def test_example_configs_are_valid():
    configs = sorted(f for f in os.listdir(os.path.join(REPO, "train", "configs")) if f.endswith(".toml"))
    assert configs
    for name in configs:
        load_train_config(os.path.join(REPO, "train", "configs", name))


def test_learning_rate_warms_up_then_decays():
    from qasr_jax.training.config import OptimConfig

    cosine = learning_rate_schedule(OptimConfig(learning_rate=1.0, warmup_steps=4, end_lr_ratio=0.1), 104)
    assert [float(cosine(s)) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert float(cosine(54)) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)  # halfway through the decay
    assert float(cosine(104)) == pytest.approx(0.1, abs=1e-6)
    linear = learning_rate_schedule(OptimConfig(learning_rate=2.0, decay="linear", end_lr_ratio=0.0), 10)
    assert [float(linear(s)) for s in (0, 5, 10)] == pytest.approx([2.0, 1.0, 0.0])
    constant = learning_rate_schedule(OptimConfig(learning_rate=3.0, warmup_steps=2, decay="constant"), 10)
    assert [float(constant(s)) for s in (0, 1, 9)] == pytest.approx([1.5, 3.0, 3.0])


def test_error_rates_and_normalisation_match_jiwer():
    import jiwer

    assert normalize_text("  Hello, World! [noise] It's   (um) fine. ") == "hello world it's fine"
    refs = ["the cat sat on the mat", "a b c d", "one two"]
    hyps = ["the cat sat on a mat today", "a c d e", ""]
    for ref, hyp in zip(refs, hyps):
        if not hyp:
            assert edit_distance(ref.split(), []) == len(ref.split())
            continue
        measured = jiwer.process_words(ref, hyp)
        assert edit_distance(ref.split(), hyp.split()) == (
            measured.substitutions + measured.deletions + measured.insertions
        )
    counts = ErrorCounts()
    for ref, hyp in zip(refs[:2], hyps[:2]):
        counts.add(ref, hyp, "English")
    assert counts.rates()["wer"] == pytest.approx(jiwer.wer(refs[:2], hyps[:2]))
    counts = ErrorCounts()
    counts.add("今天天气很好。", "今天天汽很好", "Chinese")
    assert counts.rates()["cer"] == pytest.approx(jiwer.cer("今天天气很好", "今天天汽很好"))
    assert counts.rates().keys() == {"cer"}


def test_boundary_shift_repairs_predictions_like_the_aligner():
    words = [data_lib.WordTime("a", 0.0, 0.16), data_lib.WordTime("b", 0.24, 0.4)]
    # Classes of 80 ms: a non-monotonic outlier (1 after 3) is repaired before the shift is measured.
    shifts = boundary_shift_ms([0, 2, 1, 5], words, 80.0)
    assert shifts.tolist() == pytest.approx([0.0, 0.0, abs(160 - 240), 0.0])


# --------------------------------------------------------------------------------------------------------------
# Data


def test_bad_manifest_rows_are_counted_and_skipped_with_reasons(tmp_path, caplog):
    import soundfile

    model_dir = _tiny_model_dir(tmp_path / "model")
    config = load_config(model_dir)
    tokens = data_lib.Tokenization(text_io.Tokenizer.from_pretrained(model_dir), config)
    rows = tf.speech_rows(tf.SENTENCES[:3])
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not audio", encoding="utf-8")
    long_audio = tmp_path / "long.wav"
    soundfile.write(long_audio, np.zeros(16000 * 4, np.float32), 16000)
    vanishing = tmp_path / "vanishing.wav"
    shutil.copy(rows[2]["audio"], vanishing)
    lines = [
        json.dumps(rows[0]),
        "{not json",
        "[1, 2]",
        json.dumps({"audio": rows[0]["audio"]}),
        json.dumps({"audio": "missing.wav", "text": "x"}),
        json.dumps({"audio": rows[0]["audio"], "text": "x", "language": "Klingon"}),
        json.dumps({"audio": str(not_audio), "text": "x"}),
        json.dumps({"audio": str(long_audio), "text": "x"}),
        "",
        json.dumps({**rows[1], "language": None, "context": "names: Bo"}),
        json.dumps({**rows[2], "audio": str(vanishing)}),
    ]
    manifest = tf.write_manifest(tmp_path / "train.jsonl", lines)
    with caplog.at_level("WARNING", logger="qasr_jax.training.data"):
        report = data_lib.read_manifest(manifest, tokens, "asr", max_seconds=3.0)
    assert [e.line for e in report.examples] == [1, 10, 11]
    assert [line for line, _ in report.skipped] == [2, 3, 4, 5, 6, 7, 8]
    assert dict(report.reasons) == {"invalid JSON": 1, "invalid row": 1, "missing field": 1, "missing audio": 1,
                                    "unsupported language": 1, "unreadable audio": 1, "too long": 1}  # fmt: skip
    for line, _ in report.skipped:
        assert f"train.jsonl:{line}: skipped:" in caplog.text

    # The target is exactly what inference produces: "language X<asr_text>text<|im_end|>"; rows without a
    # language say "None", as the official recipe writes them.
    tok = tokens.tokenizer
    first, second = report.examples[0], report.examples[1]
    assert tok.decode(list(first.targets)) == f"language English<asr_text>{rows[0]['text']}<|im_end|>"
    assert tok.decode(list(second.targets)).startswith("language None<asr_text>")
    prompt = first.template[: len(first.template) - len(first.targets)]
    assert list(prompt) == text_io.build_prompt_ids(tok, 1, "", None)

    # A file that disappears after the manifest was read: its batch row is emptied, counted and logged.
    os.remove(vanishing)
    shapes = data_lib.Shapes(config, 16, 16)
    (spec,) = data_lib.eval_specs(report.examples, shapes, 4)
    caplog.clear()
    with caplog.at_level("WARNING", logger="qasr_jax.training.data"):
        loaded = data_lib.BatchLoader(report.examples, tokens)(spec)
    batch = loaded.batch
    rows_by_line = {report.examples[i].line: r for r, i in enumerate(spec.rows)}
    bad = rows_by_line[11]
    assert loaded.failed.tolist() == [r == bad for r in range(len(spec.rows))]
    assert "vanishing.wav: row dropped" in caplog.text
    assert batch.label_weights[bad].sum() == 0
    assert spec.weights.count(0.0) == 1  # the eval batch is filled to 4 rows with a zero-weight copy
    good = rows_by_line[1]
    n_audio = config.audio.output_length(audio_io.num_frames(first.num_samples))
    ids = batch.input_ids[good]
    assert (ids == tokens.audio_pad_id).sum() == n_audio
    positions = batch.label_positions[good][: len(first.targets)]
    # The logits at each position predict the next token: the targets follow their positions.
    assert ids[positions + 1].tolist() == list(first.targets)
    assert spec.frames % config.audio.chunk_frames == 0


def test_batch_plan_is_a_pure_function_of_the_step(tmp_path):
    examples = [
        data_lib.Example(i, f"{i}.wav", "t", None, 16000 + 1600 * i, (1, 2, 3), (3,), (1,)) for i in range(10)
    ]
    config = config_from_dict(tf.tiny_config_dict())
    shapes = data_lib.Shapes(config, 16, 16)
    plan = data_lib.BatchPlan(examples, shapes, batch_size=4, steps=9, seed=3, sort_window=2)
    again = data_lib.BatchPlan(examples, shapes, batch_size=4, steps=9, seed=3, sort_window=2)
    assert [again[s] for s in (8, 2, 5)] == [plan[s] for s in (8, 2, 5)]
    epoch = [set(plan[s].rows) for s in range(3)]
    assert set().union(*epoch) == set(range(10))  # an epoch covers every row (the last batch wraps around)
    assert [plan[s].rows for s in range(3)] != [plan[s].rows for s in range(3, 6)]  # reshuffled per epoch
    with pytest.raises(IndexError):
        plan[9]


# --------------------------------------------------------------------------------------------------------------
# Sharded train step


def test_train_step_on_meshes_matches_single_device(tmp_path):
    """One AdamW step (clipping, weight decay) on 8 devices equals one device; the mixed mesh accumulates
    gradients over 2 micro-batches."""
    result = run_mesh_check("train", str(tmp_path))
    print(json.dumps(result, indent=1))
    assert result["devices"] == 8
    assert len(result["meshes"]) == 4
    for spec, r in result["meshes"].items():
        assert r["loss_rel"] <= 1e-5, (spec, r)
        assert r["grad_norm_rel"] <= 1e-5, (spec, r)
        assert r["param_rel_max"] <= 1e-5, (spec, r)
        assert r["zero_gradient_leaf_step"] <= 1e-3 * 1.001, (spec, r)


# --------------------------------------------------------------------------------------------------------------
# The objective against the official model


def test_loss_matches_official_pytorch_model(tmp_path):
    """Our data pipeline + loss on a batch = the official thinker's loss (labels on the target tokens only),
    on token sequences the official processor builds from the chat template."""
    import torch
    from qwen_asr.core.transformers_backend import Qwen3ASRProcessor

    from qasr_jax.model import Qwen3ASR
    from tests.support import official

    model_dir = official.build_checkpoint(tmp_path / "ckpt", official.small_asr_config(), seed=3)
    config, params = load_pretrained(model_dir)
    tokenizer = text_io.Tokenizer.from_pretrained(model_dir)
    tokens = data_lib.Tokenization(tokenizer, config)
    rows = tf.speech_rows(tf.SENTENCES[:3])
    rows[1] = {**rows[1], "language": None, "context": "Names: Bo, Al."}
    report = data_lib.read_manifest(tf.write_manifest(tmp_path / "m.jsonl", rows), tokens)
    (spec,) = data_lib.eval_specs(report.examples, data_lib.Shapes(config, 16, 16), 3)
    batch = data_lib.BatchLoader(report.examples, tokens)(spec).batch
    model = Qwen3ASR(config)
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    loss, counts = jax.jit(
        lambda p, b: losses.loss_sums(model, p, b, losses.Objective(), jnp.sum(b.label_weights), jnp.float32(1))
    )(params, batch)
    ours = float(loss)  # the CE per target token (CE only)
    np.testing.assert_allclose(ours, float(counts["ce"]) / float(counts["weight"]), rtol=1e-6)

    processor = Qwen3ASRProcessor.from_pretrained(model_dir, fix_mistral_regex=True)
    reference = official.load_official(model_dir)
    total_ce = total_targets = 0.0
    for r, index in enumerate(spec.rows):
        example, row = report.examples[index], rows[index]
        messages = [{"role": "system", "content": row.get("context") or ""},
                    {"role": "user", "content": [{"type": "audio", "audio": ""}]}]  # fmt: skip
        prefix = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        target = f"language {row.get('language') or 'None'}<asr_text>{row['text']}"
        samples = audio_io.load_audio(example.audio)
        # One row at a time: the official feature extractor pads a batch to its longest clip.
        full = processor(
            text=[prefix + target + "<|im_end|>"], audio=[samples], return_tensors="pt", padding=True
        )
        short = processor(text=[prefix], audio=[samples], return_tensors="pt", padding=True)
        n_targets = int(full["attention_mask"].sum()) - int(short["attention_mask"].sum())
        ids = full["input_ids"][0].numpy()
        assert ids.tolist() == batch.input_ids[r][: int(batch.attention_mask[r].sum())].tolist()
        assert n_targets == len(example.targets)
        labels = full["input_ids"].clone()
        labels[:, : labels.shape[1] - n_targets] = -100
        with torch.no_grad():
            out = reference.thinker(**full, labels=labels, use_cache=False)
        total_ce += float(out.loss) * n_targets
        total_targets += n_targets
    theirs = total_ce / total_targets
    print(f"loss ours {ours:.7f} official {theirs:.7f}")
    assert total_targets == float(counts["weight"])
    assert abs(ours - theirs) / theirs <= 1e-5


# --------------------------------------------------------------------------------------------------------------
# Training runs


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    """A tiny model trained on four espeak-ng utterances (bf16 compute, fp32 master weights), then exported."""
    from qasr_jax.training import train

    root = tmp_path_factory.mktemp("overfit")
    model_dir = _tiny_model_dir(root / "model")
    manifest = tf.write_manifest(root / "train.jsonl", tf.speech_rows())
    toml = tf.train_toml(model_dir, manifest, str(root / "run"), {
        "model": {"dtype": "bfloat16"},
        "optim": {"learning_rate": 1e-2, "warmup_steps": 10, "decay": "cosine", "end_lr_ratio": 0.1},
        "data": {"eval_manifest": manifest},
        "run": {"steps": 60, "log_every": 20, "save_every": 0, "eval_max_new_tokens": 24,
                "export_dir": str(root / "export"), "export_dtype": "float32"},
    })  # fmt: skip
    (root / "run.toml").write_text(toml, encoding="utf-8")
    summary = train(load_train_config(root / "run.toml"))
    return {"root": root, "summary": summary, "model_dir": model_dir, "export": str(root / "export"),
            "metrics": read_metrics(root / "run" / "metrics.jsonl", "train")}  # fmt: skip


def test_tiny_model_overfits_espeak_utterances(overfit_run):
    losses_by_step = [r["loss"] for r in overfit_run["metrics"]]
    first, last = losses_by_step[0], losses_by_step[-1]
    print(f"loss {first:.3f} → {last:.4f} in {len(losses_by_step)} steps")
    assert len(losses_by_step) == 60
    assert first / last >= 10
    assert overfit_run["summary"]["train"]["accuracy"] >= 0.9
    # Decoded greedily by the inference program, the four utterances come out word for word.
    evaluation = overfit_run["summary"]["eval"]
    print("eval", evaluation)
    assert evaluation["wer"] == 0.0 and evaluation["language_accuracy"] == 1.0


def test_exported_checkpoint_loads_in_official_code_with_same_logits(overfit_run):
    """The trained model, written in the released layout, loads in the official code and in ours with the
    same logits."""
    from qasr_jax.model import Qwen3ASR
    from tests.support import official

    export = overfit_run["export"]
    assert sorted(os.listdir(export)) == sorted(["config.json", "model.safetensors", *tf.TOKENIZER_FILES])
    config, params = load_pretrained(export)
    # The export holds exactly the trained params (the run's final checkpoint).
    trained = load_checkpoint_params(overfit_run["root"] / "run" / "checkpoints" / "60" / "state")
    from qasr_jax.weights import flatten_params

    for path, value in flatten_params(params):
        assert np.array_equal(np.asarray(value), trained["params/" + "/".join(path)]), path

    samples = speech.synth(tf.SENTENCES[0], speed=190)
    features = official.official_features([samples])
    n_audio = config.audio.output_length(features[0][1])
    tokenizer = text_io.Tokenizer.from_pretrained(export)
    ids = np.asarray([text_io.build_prompt_ids(tokenizer, n_audio) + tokenizer.encode("language English")])
    mask = np.ones_like(ids)
    feats, feat_mask = official.pad_features(features)
    ours = np.asarray(Qwen3ASR(config).apply({"params": params}, ids, mask, feats, feat_mask))
    reference = official.load_official(export)
    theirs = official.official_logits(reference, ids, mask, features)
    worst = float(np.max(np.abs(ours - theirs)))
    print(f"exported model: max |logit difference| {worst:.2e} = {worst / np.std(theirs):.2e} std")
    assert ours.shape == theirs.shape
    assert worst <= 1e-3 * np.std(theirs)  # the fp32 rule of docs/testing.md
    # The trained model says the utterance: its greedy next token after "language English" is <asr_text>.
    assert int(np.argmax(theirs[0, -1])) == tokenizer.asr_text_id


def test_export_round_trips_through_our_loader(tmp_path):
    for aligner in (False, True):
        config = config_from_dict(tf.tiny_config_dict(aligner=aligner))
        params = _random_params(config, seed=5)
        source = tf.DEMO_ALIGNER_DIR if aligner else tf.DEMO_ASR_DIR
        for dtype in ("float32", "bfloat16"):
            out = export_pretrained(tmp_path / f"{aligner}-{dtype}", config, params, source, dtype=dtype)
            loaded_config, loaded = load_pretrained(out)
            assert loaded_config == config
            for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
                assert a.dtype == jnp.dtype(dtype)
                assert np.array_equal(np.asarray(a), np.asarray(b).astype(jnp.dtype(dtype)))
            assert not os.path.exists(str(out) + ".partial")


def test_kill_and_resume_reproduces_the_uninterrupted_loss_trajectory(tmp_path):
    """Killed while committing a checkpoint, and again between checkpoints, the run resumes each time from
    its last complete checkpoint and logs exactly the losses of an uninterrupted run. The encoder is frozen
    and layers are rematerialised, and the frozen encoder stays bit-identical."""
    model_dir = _tiny_model_dir(tmp_path / "model")
    manifest = tf.write_manifest(tmp_path / "train.jsonl", tf.speech_rows())
    overrides = {"model": {"freeze": ["encoder"], "remat": "layers"}, "data": {"batch_size": 2},
                 "run": {"steps": 8, "save_every": 2}}  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    # The four runs compile the same programs: share them through a compilation cache.
    env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_PLATFORMS="cpu")  # fmt: skip

    def run(name: str, *kill: str, keep_last: int = 2) -> subprocess.CompletedProcess:
        config = tmp_path / f"{name}.toml"
        sections = {**overrides, "run": {**overrides["run"], "keep_last": keep_last}}
        config.write_text(
            tf.train_toml(model_dir, manifest, str(tmp_path / name), sections), encoding="utf-8"
        )
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "tests.support.train_kill_run", str(config), *kill],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        print(f"{name} {' '.join(kill)}: exit {done.returncode} after {time.perf_counter() - started:.1f} s")
        return done

    def losses_of(name: str) -> dict[int, float]:
        # The last record of a step wins: steps after a checkpoint are run (and logged) again after a resume.
        return {r["step"]: r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl", "train")}

    reference = run("reference", keep_last=4)  # keeps step 2, to check the frozen encoder against
    assert reference.returncode == 0, reference.stderr[-3000:]
    from qasr_jax.training.checkpointing import Checkpoints

    first = run("resumed", "--kill-in-save", "4")
    assert first.returncode == -9, first.stderr[-3000:]
    checkpoints_dir = tmp_path / "resumed" / "checkpoints"
    left = os.listdir(checkpoints_dir)
    assert "2" in left and "4" not in left and any("tmp" in name for name in left), left  # 4 half-committed
    assert Checkpoints(checkpoints_dir, async_save=False).latest_step() == 2
    assert max(losses_of("resumed")) >= 4  # saves are asynchronous: training went on while 4 was written

    second = run("resumed", "--kill-after-step", "7")
    assert second.returncode == -9, second.stderr[-3000:]
    assert Checkpoints(checkpoints_dir, async_save=False).latest_step() in (4, 6)

    third = run("resumed")
    assert third.returncode == 0, third.stderr[-3000:]
    expected, got = losses_of("reference"), losses_of("resumed")
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    print({s: (expected[s], got[s]) for s in expected})
    assert all(math.isclose(got[s], expected[s], rel_tol=1e-6) for s in expected), (expected, got)
    assert Checkpoints(checkpoints_dir, async_save=False).all_steps() == [6, 8]  # keep_last = 2
    assert not any("tmp" in name for name in os.listdir(checkpoints_dir))

    reference_final = load_checkpoint_params(tmp_path / "reference" / "checkpoints" / "8" / "state")
    resumed_final = load_checkpoint_params(checkpoints_dir / "8" / "state")
    early = load_checkpoint_params(tmp_path / "reference" / "checkpoints" / "2" / "state")
    for path, value in reference_final.items():
        np.testing.assert_allclose(resumed_final[path], value, rtol=1e-6, atol=1e-7)
        if path.startswith("params/audio_tower"):
            assert np.array_equal(value, early[path]), path
        elif path.startswith("params/decoder"):
            assert not np.array_equal(value, early[path]), path


def load_checkpoint_params(path) -> dict[str, np.ndarray]:
    """The param arrays of a saved train state, by path (read without a target)."""
    import orbax.checkpoint as ocp

    from qasr_jax.weights import flatten_params

    with warnings.catch_warnings(), ocp.PyTreeCheckpointer() as checkpointer:
        warnings.filterwarnings("ignore", message="Sharding info not provided")  # one host, one device: fine
        tree = checkpointer.restore(os.path.abspath(path))
    return {"params/" + "/".join(p): np.asarray(v) for p, v in flatten_params(tree["params"])}


# --------------------------------------------------------------------------------------------------------------
# Aligner objective


def test_aligner_targets_are_timestamp_classes_and_eval_measures_boundary_shift(tmp_path):
    from qasr_jax import sharding
    from qasr_jax.model import Qwen3ASR
    from qasr_jax.training.config import ModelConfig, OptimConfig
    from qasr_jax.training.evaluate import Evaluator
    from qasr_jax.training.step import Trainer

    model_dir = _tiny_model_dir(tmp_path / "aligner", aligner=True)
    config = load_config(model_dir)
    tokenizer = text_io.Tokenizer.from_pretrained(model_dir)
    tokens = data_lib.Tokenization(tokenizer, config)
    rows = tf.speech_rows(tf.SENTENCES[:2])
    bad = {**rows[0], "words": [{"text": "late", "start": 0.5, "end": 0.4}]}
    report = data_lib.read_manifest(tf.write_manifest(tmp_path / "a.jsonl", [*rows, bad]), tokens, "aligner")
    assert len(report.examples) == 2 and report.reasons == {"words": 1}
    example = report.examples[0]
    segment = config.timestamp_segment_time
    expected = [round(t * 1000 / segment) for w in rows[0]["words"] for t in (w["start"], w["end"])]
    assert list(example.targets) == expected

    shapes = data_lib.Shapes(config, 16, 16)
    loader = data_lib.BatchLoader(report.examples, tokens)
    trainer = Trainer(config, ModelConfig(checkpoint=model_dir), OptimConfig(), 1,
                      sharding.make_mesh("data=1", jax.devices()[:1]))  # fmt: skip
    params = _random_params(config, seed=2)
    evaluator = Evaluator(trainer, report.examples, loader, shapes, 2, "aligner", tokenizer)
    (spec,) = evaluator.specs
    batch = loader(spec).batch
    r = spec.rows.index(0)
    n = len(example.targets)
    positions = batch.label_positions[r, :n]
    assert (batch.input_ids[r, positions] == tokenizer.timestamp_id).all()

    # The classes at the slots are those of the full forward pass at the <timestamp> tokens.
    classes, sums = trainer.eval_step(params, trainer.shard_batch(batch))
    full = Qwen3ASR(config).apply({"params": params}, batch.input_ids, batch.attention_mask,
                                  *_features(batch))  # fmt: skip
    np.testing.assert_array_equal(np.asarray(classes)[r, :n], np.argmax(np.asarray(full)[r, positions], -1))
    metrics = evaluator.evaluate(params)
    shifts = np.concatenate([boundary_shift_ms(np.asarray(classes)[i, : len(report.examples[j].targets)],
                                               report.examples[j].words, segment)
                             for i, j in enumerate(spec.rows)])  # fmt: skip
    assert metrics["boundary_shift_ms"] == pytest.approx(float(np.mean(shifts)))
    assert metrics["loss"] == pytest.approx(float(sums["ce_sum"]) / float(sums["weight"]))


def _features(batch: data_lib.Batch) -> tuple[np.ndarray, np.ndarray]:
    frames = losses.batch_frames(batch.waveforms)
    mel, valid = audio_io.log_mel(
        jnp.asarray(batch.waveforms), jnp.asarray(batch.wave_lengths), frames=frames
    )
    return np.asarray(mel), (np.arange(frames)[None] < np.asarray(valid)[:, None]).astype(np.int32)


def test_ctc_auxiliary_loss_matches_torch_ctc(tmp_path):
    """The CTC term = torch's CTC loss on the head's logits of the RMS-normalised audio embeddings (sum over
    rows, per-row weights); rows whose labels cannot fit their audio tokens, counting the blank each repeated
    label needs, and zero-weight rows count nothing."""
    import torch

    from qasr_jax.model import Qwen3ASR
    from tests.test_asr import cached_small_checkpoint

    config, params = load_pretrained(cached_small_checkpoint())
    model = Qwen3ASR(config)
    rng = np.random.default_rng(0)
    rows, steps, labels_len = 6, 12, 5
    audio = jnp.asarray(0.03 * rng.standard_normal((rows, steps, config.text.hidden_size)), jnp.float32)
    # row 2: 3 audio tokens for 5 labels; row 4: 3 labels fit 4 tokens, but not with the 2 blanks their repeats
    # need; row 5: 2 labels + 1 repeat in 3 tokens fit exactly.
    lengths = jnp.asarray([12, 9, 3, 12, 4, 3], jnp.int32)
    labels = rng.integers(1, 50, (rows, labels_len)).astype(np.int32)
    labels[4, :3] = 7
    labels[5, :2] = 9
    counts = np.asarray([5, 3, 5, 4, 3, 2])
    paddings = (np.arange(labels_len)[None, :] >= counts[:, None]).astype(np.float32)
    weights = np.ones((rows, 3), np.float32)
    weights[3] = 0.0  # a padding row
    unused = dict.fromkeys(
        ("waveforms", "wave_lengths", "input_ids", "attention_mask", "label_positions", "labels")
    )
    batch = data_lib.Batch(ctc_labels=jnp.asarray(labels), ctc_label_paddings=jnp.asarray(paddings),
                           label_weights=jnp.asarray(weights), **unused)  # fmt: skip
    blank = 0
    ours = float(losses.ctc_sum(model, params, audio, lengths, batch, blank))
    assert np.asarray(losses.ctc_feasible(jnp.asarray(labels), jnp.asarray(paddings), lengths)).tolist() == [
        True, True, False, True, False, True,
    ]  # fmt: skip

    x = np.asarray(audio, np.float64)
    x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    table = np.asarray(params["embed_tokens"]["embedding"], np.float64)
    logits = x @ table.T  # the tied head on unit-RMS embeddings
    log_probs = torch.log_softmax(torch.from_numpy(logits), -1).transpose(0, 1)  # [T, B, V]
    per_row = torch.nn.functional.ctc_loss(
        log_probs, torch.from_numpy(labels).long(), torch.from_numpy(np.asarray(lengths)).long(),
        torch.from_numpy(counts).long(), blank=blank, reduction="none", zero_infinity=False,
    ).numpy()  # fmt: skip
    expected = per_row[0] + per_row[1] + per_row[5]  # rows 2 and 4 cannot fit, row 3 has no weight
    assert np.isfinite(per_row[[0, 1, 3, 5]]).all() and not np.isfinite(per_row[[2, 4]]).any()
    np.testing.assert_allclose(ours, expected, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# The CTC objective: labels, windows, lengths, the audio-use gauge


def test_ctc_labels_do_not_depend_on_where_a_word_stands():
    """A word has the same CTC labels first in a sentence, mid-sentence and alone; no label is a lone word
    separator; the labels read back as the words, with the full tokenizer and with its first 500 merges."""
    tokenizer = text_io.Tokenizer.from_pretrained(tf.DEMO_ASR_DIR)
    config = load_config(tf.DEMO_ASR_DIR)
    for merges in (0, 500):
        tokens = data_lib.Tokenization(tokenizer, config, merges)
        dog = tokens.ctc_labels("dog")
        assert tokens.ctc_labels("dog sees the cat")[: len(dog)] == dog
        assert tokens.ctc_labels("the dog")[-len(dog) :] == dog
        for text in ("there are 30 round kitchens behind this garage", "es gibt 8 Brüder im sauberen Tiger"):
            labels = tokens.ctc_labels(text)
            assert not set(labels) & tokens.space_ids
            assert label_words(tokenizer, labels) == text.split()
    full, coarse = data_lib.Tokenization(tokenizer, config), data_lib.Tokenization(tokenizer, config, 500)
    # "kitchens" is one id of the full vocabulary, several shared pieces with 500 merges.
    assert len(full.ctc_labels("kitchens")) == 1 < len(coarse.ctc_labels("kitchens"))
    # Rows without ctc_text: sentence case and punctuation do not reach the labels.
    assert data_lib.spoken_words("The dog sees 3 cats.") == "the dog sees 3 cats"
    assert data_lib.spoken_words("I see it.") == "I see it"


def test_manifest_ctc_text_and_text_weights(tmp_path):
    """``ctc_text`` gives the CTC labels; text_weights mark exactly the transcript's targets."""
    model_dir = _tiny_model_dir(tmp_path / "model")
    config = load_config(model_dir)
    tokenizer = text_io.Tokenizer.from_pretrained(model_dir)
    tokens = data_lib.Tokenization(tokenizer, config)
    clip = tf.speech_rows(["The dog sees a cat."])[0]
    rows = [dict(clip, text="The dog sees a cat.", language="English", ctc_text="the dog sees a cat"),
            dict(clip, text="The dog sees a cat.", language="English")]  # fmt: skip
    report = data_lib.read_manifest(tf.write_manifest(tmp_path / "m.jsonl", rows), tokens)
    with_field, derived = report.examples
    assert with_field.transcript == derived.transcript == tuple(tokens.ctc_labels("the dog sees a cat"))
    shapes = data_lib.Shapes(config, 16, 16)
    spec = shapes.spec(0, report.examples, [0], [1.0])
    batch = data_lib.BatchLoader(report.examples, tokens)(spec).batch
    text_targets = tokenizer.encode("The dog sees a cat.", allow_special=False)
    marked = batch.labels[0][batch.text_weights[0] > 0].tolist()
    assert marked == text_targets
    assert batch.label_weights[0].sum() == len(with_field.targets)


def test_training_window_and_token_lengths_are_exact(tmp_path):
    """A batch shorter than the attention window, encoded with the window narrowed to the batch, gives the
    embeddings of the full window; the jnp token count equals the config's."""
    from qasr_jax.model import Qwen3ASR

    config = load_config(_tiny_model_dir(tmp_path / "model"))
    for samples in (800, 1600, 15999, 16000, 16160, 33333, 47000):
        got = int(losses.audio_token_lengths(config.audio, jnp.asarray([samples]))[0])
        assert got == config.audio.output_length(audio_io.num_frames(samples)), samples
    params = _random_params(config)
    model = Qwen3ASR(config)
    rng = np.random.default_rng(0)
    frames = 100
    features = jnp.asarray(rng.standard_normal((2, config.audio.num_mel_bins, frames)), jnp.float32)
    mask = (np.arange(frames)[None] < np.asarray([[100], [57]])).astype(np.int32)
    window = losses.training_window(config.audio, frames)
    assert window == 1 < config.audio.window_chunks
    full, lengths = model.apply({"params": params}, features, mask, method=Qwen3ASR.encode_audio)
    narrow, _ = model.apply({"params": params}, features, mask, window, method=Qwen3ASR.encode_audio)
    for r, n in enumerate(np.asarray(lengths)):
        np.testing.assert_allclose(np.asarray(narrow[r, :n]), np.asarray(full[r, :n]), rtol=1e-5, atol=1e-6)


def test_frame_targets_put_each_word_under_its_tokens():
    """Hand-computed: token j of chunk c has its centre at (100c + 8j + 4) / 100 s; a word's labels split its
    tokens evenly; the blank elsewhere."""
    config = load_config(tf.DEMO_ASR_DIR).audio
    blank = 5
    words = [(0.05, 0.30, (7,)), (0.50, 1.20, (8, 9)), (1.5, 1.51, (4,))]  # the last covers no centre
    got = data_lib.frame_targets(words, 26, config, blank)
    expected = np.full(26, blank)
    expected[1:4] = 7  # centres 0.12, 0.20, 0.28
    expected[6:11] = 8  # 0.52 … 0.84: the first 5 of the word's 9 tokens
    expected[11:13] = 9  # 0.92, 1.00
    expected[13:15] = 9  # 1.04, 1.12 (second chunk)
    assert got.tolist() == expected.tolist()


def test_conditions_parse_and_name_their_errors():
    from qasr_jax.training.config import parse_condition

    stop = parse_condition("ctc_wer <= 0.25")
    assert (stop.metric, stop.op, stop.value, stop.step) == ("ctc_wer", "<=", 0.25, 0)
    assert stop.holds({"ctc_wer": 0.25}) and not stop.holds({"ctc_wer": 0.3}) and stop.holds({}) is None
    gate = parse_condition("1000: ctc_gap_ratio >= 0.1", gate=True)
    assert (gate.step, gate.metric) == (1000, "ctc_gap_ratio")
    for bad, message in (("ctc_wer = 0.2", "METRIC OP VALUE"), ("wer <= x", "'x' is not a number")):
        with pytest.raises(ValueError, match=message):
            parse_condition(bad)
    with pytest.raises(ValueError, match="STEP: METRIC OP VALUE"):
        parse_condition("wer <= 0.2", gate=True)


@pytest.mark.slow
def test_stop_when_ends_the_run_and_a_rerun_exports_without_training_on(tmp_path):
    """A met ``run.stop_when`` ends the run at that evaluation (checkpoint, export); rerunning the command finds
    the marker and exports the same step. A failed gate raises GateFailed naming the gate and the value."""
    from qasr_jax.training import train
    from qasr_jax.training.loop import GateFailed

    model_dir = _tiny_model_dir(tmp_path / "model")
    manifest = tf.write_manifest(tmp_path / "train.jsonl", tf.speech_rows(tf.SENTENCES[:2]))

    def config(name: str, run: dict) -> object:
        toml = tf.train_toml(model_dir, manifest, str(tmp_path / name), {
            "data": {"eval_manifest": manifest, "eval_batch_size": 2},
            "run": {"steps": 10, "eval_every": 2, "save_every": 0, "eval_max_new_tokens": 4,
                    "export_dir": str(tmp_path / name / "export"), "async_checkpointing": False, **run},
        })  # fmt: skip
        (tmp_path / f"{name}.toml").write_text(toml, encoding="utf-8")
        return load_train_config(tmp_path / f"{name}.toml")

    stopping = config("stop", {"stop_when": "loss >= 0"})
    assert train(stopping)["step"] == 2
    marker = json.loads((tmp_path / "stop" / "stopped.json").read_text())
    assert marker == {"step": 2, "stop_when": "loss >= 0"}
    assert (tmp_path / "stop" / "export" / "model.safetensors").is_file()
    assert [r["step"] for r in read_metrics(tmp_path / "stop" / "metrics.jsonl", "train")] == [1, 2]
    (tmp_path / "stop" / "export" / "model.safetensors").unlink()
    assert train(stopping)["step"] == 2  # the rerun trains no further step: it exports again
    assert (tmp_path / "stop" / "export" / "model.safetensors").is_file()
    assert [r["step"] for r in read_metrics(tmp_path / "stop" / "metrics.jsonl", "train")] == [1, 2]

    with pytest.raises(GateFailed, match=r"gate '2: loss < 0' failed at step 2: loss = \d"):
        train(config("gate", {"gates": ["2: loss < 0"]}))
    assert read_metrics(tmp_path / "gate" / "metrics.jsonl", "gate")[0]["passed"] == 0.0
