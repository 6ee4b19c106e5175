"""Manifest jobs (``qasr_jax.batch_jobs``): the global plan, the split by process, results files, the pipeline."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import soundfile

from qasr_jax import batch_jobs
from qasr_jax.batch_jobs import Job, PlannedBatch
from tests.support import speech

# A mixed bag: mostly short, a long tail, two over the 100 s chunk limit used below, and two unknown lengths.
SECONDS = [3.0, 250.0, 1.0, None, 14.0, 61.0, 2.5, 7.0, 120.0, 33.0, 0.5, 9.0, None, 44.0, 5.0, 18.0, 600.0]


def padded_seconds(groups: list[list[float]], batch_size: int) -> float:
    """Audio-seconds a batch computes over when every row is padded to its longest (rows to a power of two)."""
    total = 0.0
    for group in groups:
        rows = min(1 << max(len(group) - 1, 0).bit_length(), batch_size)
        total += rows * max(group)
    return total


def test_plan_covers_every_item_once_longest_first_with_unknown_lengths_last():
    plan = batch_jobs.plan_batches(SECONDS, batch_size=4, max_chunk_seconds=100.0)
    items = [i for batch in plan for i in batch.items]
    assert sorted(items) == list(range(len(SECONDS)))
    known = [b for b in plan if b.seconds is not None]
    assert [b.items for b in plan[len(known) :]] == [(3, 12)]  # unknown lengths last, in manifest order
    lengths = [SECONDS[i] / batch_jobs.chunk_count(SECONDS[i], 100.0) for b in known for i in b.items]
    assert lengths == sorted(lengths, reverse=True)  # one global order, longest first
    for batch in plan:
        assert batch.rows <= 4 or len(batch.items) == 1  # an item over the batch size runs alone
        rows = sum(batch_jobs.chunk_count(SECONDS[i], 100.0) if SECONDS[i] else 1 for i in batch.items)
        assert batch.rows == rows
    assert batch_jobs.chunk_count(600.0, 100.0) == 6 and batch_jobs.chunk_count(100.0, 100.0) == 1
    assert plan[0].items == (16,) and plan[0].rows == 6  # over the batch size: a batch of its own


def test_global_plan_pads_less_than_manifest_order_groups():
    """The padded audio of the plan is less than that of batches cut from manifest-order groups (the previous
    path), on 400 durations drawn like a real dataset's."""
    rng = np.random.default_rng(0)
    seconds = list(np.exp(rng.uniform(np.log(1.0), np.log(600.0), 400)))
    plan = batch_jobs.plan_batches(seconds, batch_size=8, max_chunk_seconds=1200.0)
    planned = padded_seconds([[seconds[i] for i in b.items] for b in plan], 8)
    grouped = []
    for start in range(0, len(seconds), 64):  # groups of 64 in file order, sorted within, batches of 8
        group = sorted(seconds[start : start + 64], reverse=True)
        grouped += [group[k : k + 8] for k in range(0, len(group), 8)]
    previous = padded_seconds(grouped, 8)
    real = sum(seconds)
    assert planned == pytest.approx(sum(b.cost for b in plan))
    assert (planned - real) / planned < 0.5 * (previous - real) / previous
    print(f"padding waste: planned {1 - real / planned:.1%}, manifest-order groups {1 - real / previous:.1%}")


def test_max_batch_seconds_bounds_padded_audio_with_power_of_two_rows():
    plan = batch_jobs.plan_batches([300.0] * 5 + [10.0] * 9, 8, 1200.0, max_batch_seconds=700.0)
    assert [b.rows for b in plan] == [2, 2, 2, 8]  # the fifth 300 s item shares with a 10 s one
    assert all(b.cost <= 700.0 for b in plan)
    assert batch_jobs.row_limit(8, 900.0, 700.0) == 1  # one row even when it alone is over the bound
    assert batch_jobs.row_limit(8, 10.0, None) == 8


def test_process_share_splits_the_plan_disjointly_and_evenly():
    plan = batch_jobs.plan_batches(SECONDS, batch_size=2, max_chunk_seconds=100.0)
    for count in (1, 2, 3):
        shares = [batch_jobs.process_share(plan, i, count) for i in range(count)]
        assert sorted(i for share in shares for b in share for i in b.items) == list(range(len(SECONDS)))
        costs = [sum(b.cost for b in share) for share in shares]
        assert max(costs) - min(costs) <= max(b.cost for b in plan)
        assert shares == [batch_jobs.process_share(plan, i, count) for i in range(count)]  # deterministic
    with pytest.raises(ValueError, match="process index 2"):
        batch_jobs.process_share(plan, 2, 2)
    assert PlannedBatch((0,), 2, None).cost == 60.0


def test_manifest_durations_and_bad_lines_name_the_line(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "path": "a.wav", "duration": 12.5}\nb.wav\n', encoding="utf-8")
    jobs = batch_jobs.read_manifest(str(manifest))
    assert [(j.id, j.seconds) for j in jobs] == [("a", 12.5), ("b.wav", None)]
    assert jobs[0].path == str(tmp_path / "a.wav")
    assert batch_jobs.job_seconds(jobs, probe=lambda path: 3.0) == [12.5, 3.0]
    for line, why in (('{"path": "x.wav", "duration": "long"}', "m.jsonl:2: \"duration\""),
                      ('{"id": "a", "path": "c.wav"}', "id 'a' appears more than once"),
                      ("{not json", "m.jsonl:2: not valid JSON")):  # fmt: skip
        manifest.write_text('{"id": "a", "path": "a.wav"}\n' + line + "\n", encoding="utf-8")
        with pytest.raises(ValueError, match=why):
            batch_jobs.read_manifest(str(manifest))


def test_header_probe_reads_durations_without_decoding(tmp_path):
    samples = np.zeros(int(2.5 * 22050), np.float32)
    soundfile.write(tmp_path / "a.wav", samples, 22050)
    soundfile.write(tmp_path / "a.flac", samples[:22050], 22050)
    (tmp_path / "notes.wav").write_text("not audio")
    assert batch_jobs.probe_seconds(str(tmp_path / "a.wav")) == pytest.approx(2.5)
    assert batch_jobs.probe_seconds(str(tmp_path / "a.flac")) == pytest.approx(1.0)
    assert batch_jobs.probe_seconds(str(tmp_path / "notes.wav")) is None
    assert batch_jobs.probe_seconds(str(tmp_path / "missing.wav")) is None
    assert batch_jobs.probe_seconds("-") is None
    assert batch_jobs.probe_seconds("http://127.0.0.1:9/a.wav") is None


def test_results_file_cuts_a_torn_line_and_merge_keeps_one_record_per_id(tmp_path):
    output = tmp_path / "out.jsonl"
    output.write_text('{"id": "a", "text": "x"}\n{"id": "b", "te', encoding="utf-8")  # killed mid-write
    assert batch_jobs.finished_ids(str(output)) == {"a"}
    with batch_jobs.ResultsFile(str(output)) as sink:
        sink.write({"id": "b", "text": "y"})
    assert [json.loads(line)["id"] for line in output.read_text().splitlines()] == ["a", "b"]

    part0, part1 = batch_jobs.part_path(str(output), 0, 2), batch_jobs.part_path(str(output), 1, 2)
    with open(part0, "w") as f:
        f.write('{"id": "c", "text": "z"}\n{"id": "b", "text": "y"}\n{"id": "e", "error": "bad"}\n')
    with open(part1, "w") as f:
        f.write('{"id": "d", "text": "w"}\n{"id": "c", "t')
    assert batch_jobs.part_files(str(output)) == [part0, part1]
    assert batch_jobs.finished_ids(str(output)) == {"a", "b", "c", "d"}  # parts count: a rerun skips them
    assert batch_jobs.merge_parts(str(output)) == 2
    assert [json.loads(line)["id"] for line in output.read_text().splitlines()] == ["a", "b", "c", "d"]
    assert batch_jobs.part_files(str(output)) == []
    assert batch_jobs.merge_parts(str(output)) == 0


def test_pipeline_results_equal_the_models_own_transcribe_and_a_bad_file_fails_alone(tmp_path, monkeypatch):
    from qasr_jax.asr import Qwen3ASRModel
    from tests.test_asr import cached_small_checkpoint

    model = Qwen3ASRModel.from_pretrained(
        cached_small_checkpoint(), max_inference_batch_size=2, max_new_tokens=5
    )
    clips = speech.speech_clips()
    jobs = []
    for i, (samples, rate) in enumerate([(clips[0], 16000), (clips[2], 16000), (clips[1], 16000),
                                         (clips[1][: 3 * 16000], 16000)]):  # fmt: skip
        path = tmp_path / f"c{i}.flac"
        soundfile.write(path, samples, rate)
        jobs.append(Job(f"c{i}", str(path), language="English" if i == 1 else None))
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVE")
    jobs.insert(2, Job("bad", str(tmp_path / "bad.wav")))
    jobs.append(Job("tiny", str(tmp_path / "tiny.wav")))
    soundfile.write(tmp_path / "tiny.wav", np.zeros(100, np.float32), 16000)  # under one feature frame

    # Known delays in the decode and in the model make the time accounting checkable: every decode counts (the
    # bad files' too), every result's model time counts, and the first batch waits for its audio.
    load_delay, model_delay = 0.1, 0.1
    load_audio, iter_transcribe = batch_jobs.audio_io.load_audio, model.iter_transcribe

    def slow_load(*args, **kwargs):
        time.sleep(load_delay)
        return load_audio(*args, **kwargs)

    def slow_model(*args, **kwargs):
        for item in iter_transcribe(*args, **kwargs):
            time.sleep(model_delay)
            yield item

    plan = batch_jobs.plan_batches(batch_jobs.job_seconds(jobs), 2, model.max_chunk_seconds)
    stats = batch_jobs.PipelineStats()
    with monkeypatch.context() as patch:
        patch.setattr(batch_jobs.audio_io, "load_audio", slow_load)
        patch.setattr(model, "iter_transcribe", slow_model)
        started = time.perf_counter()
        results = [(jobs[i], result) for i, result in batch_jobs.run_batches(
            model, jobs, plan, context="Topic: tests.", workers=2, stats=stats
        )]  # fmt: skip
        wall = time.perf_counter() - started
    assert sorted(job.id for job, _ in results) == sorted(job.id for job in jobs)
    by_id = {job.id: result for job, result in results}
    assert "bad.wav" in str(by_id["bad"].error) and "tiny.wav" in str(by_id["tiny"].error)
    good = [job for job in jobs if job.id not in ("bad", "tiny")]
    expected = model.transcribe([job.path for job in good], context="Topic: tests.",
                                language=[job.language for job in good])  # fmt: skip
    for job, result in zip(good, expected):
        assert (by_id[job.id].language, by_id[job.id].text) == (result.language, result.text), job.id
        assert by_id[job.id].error is None and by_id[job.id].text
    assert stats.batches == len(plan) and stats.items == len(jobs)
    assert stats.audio_seconds == pytest.approx(
        sum(len(c) for c in (clips[0], clips[2], clips[1])) / 16000 + 3
    )
    good_items, all_items = len(good), len(jobs)
    assert all_items * load_delay <= stats.load_seconds <= 2 * wall, stats  # summed over the 2 workers
    assert stats.model_seconds >= good_items * model_delay, stats
    assert stats.host_wait_seconds >= 0.5 * load_delay, stats  # the first batch's audio was not decoded yet
    # The driver either waits for audio or runs the model: the two account for its time, and no more.
    assert 0.8 * wall <= stats.host_wait_seconds + stats.model_seconds <= wall, (stats, wall)


def test_audio_reader_reads_stdin_once_and_raw_pcm_from_files_and_stdin(tmp_path):
    from qasr_jax import audio
    from qasr_jax.errors import AudioFileNotFoundError, InvalidAudioError

    clip = speech.speech_clips()[0][: 16000 + 800]  # 1.05 s at 16 kHz
    pcm = np.round(clip * 32767).astype("<i2")
    raw = tmp_path / "clip.s16le"
    raw.write_bytes(pcm.tobytes())
    wav = tmp_path / "clip.wav"
    soundfile.write(wav, clip, 16000, subtype="PCM_16")

    class Stdin:  # counts reads: a pipe can be read once
        def __init__(self, data: bytes) -> None:
            self.data, self.reads = data, 0

        def read(self) -> bytes:
            self.reads += 1
            return self.data if self.reads == 1 else b""

    piped = Stdin(wav.read_bytes())
    reader = batch_jobs.AudioReader(stdin=piped)
    from_file = audio.load_audio(str(wav))
    np.testing.assert_array_equal(reader.load("-"), from_file)
    np.testing.assert_array_equal(reader.load("-"), from_file)  # kept, not read again
    assert piped.reads == 1 and reader.probe_seconds("-") is None
    assert reader.probe_seconds(str(wav)) == pytest.approx(len(clip) / 16000)

    expected = audio.load_audio((pcm.astype(np.float32) / 32768, 8000))  # at 8 kHz: resampled to 16 kHz
    pcm_reader = batch_jobs.AudioReader(raw_pcm_rate=8000, stdin=Stdin(pcm.tobytes()))
    np.testing.assert_array_equal(pcm_reader.load(str(raw)), expected)
    np.testing.assert_array_equal(pcm_reader.load("-"), expected)
    assert len(expected) == 2 * len(clip)
    assert pcm_reader.probe_seconds(str(raw)) == pytest.approx(len(clip) / 8000)  # from the size
    assert pcm_reader.probe_seconds(str(tmp_path / "missing.s16le")) is None
    (tmp_path / "odd.s16le").write_bytes(b"\x00\x01\x02")
    with pytest.raises(InvalidAudioError, match=r"odd\.s16le: raw s16le PCM has an odd number of bytes"):
        pcm_reader.load(str(tmp_path / "odd.s16le"))
    with pytest.raises(ValueError, match="raw_pcm_rate"):
        batch_jobs.AudioReader(raw_pcm_rate=0)

    # Without a stdin, "-" is a file name like any other; a bad item is its job's error, not an exception.
    loaded = batch_jobs.load_job(Job("-", "-"), reader=batch_jobs.AudioReader())
    assert loaded.samples is None and isinstance(loaded.error, AudioFileNotFoundError)
    assert str(loaded.error).startswith("-: ")
    loaded = batch_jobs.load_job(Job("odd", str(tmp_path / "odd.s16le")), reader=pcm_reader)
    assert isinstance(loaded.error, InvalidAudioError) and loaded.samples is None
