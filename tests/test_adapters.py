"""LoRA adapters: PEFT files both ways with the official model, merging, errors, and several adapters in a batch.

The official model (qwen-asr 0.0.6) with ``peft`` is the reference: an adapter we write loads there with ``peft``
and gives our logits; an adapter ``peft`` writes loads here and gives its logits. Bar as in the parity tests:
max|Δ| ≤ 1e-3 · std(reference logits), fp32. Adapters are drawn with a non-zero B so they change the logits a lot,
and broken variants of the files (A's layout, the scaling) fail the bar.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qasr_jax import adapters as lora
from qasr_jax import audio as audio_io
from qasr_jax.engine import DecodeRequest, Engine
from qasr_jax.errors import AdapterError, UnknownAdapterError
from qasr_jax.model import Qwen3ASR
from qasr_jax.text import Tokenizer, build_prompt_ids
from qasr_jax.weights import export_pretrained, flatten_params, load_pretrained
from tests.support import official, speech
from tests.test_asr import cached_small_checkpoint

TOL = 1e-3
SPEC = lora.LoraSpec(targets=lora.DECODER_TARGETS + lora.ENCODER_ATTENTION_TARGETS, rank=4, alpha=8.0)


def rel_max_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.std(ref))


def random_adapter(config, spec: lora.LoraSpec, seed: int, b_std: float = 0.3) -> dict:
    """Adapters as training leaves them: A from the initial draw, B non-zero (so the update matters)."""
    tree = lora.init_adapters(config, spec, jax.random.key(seed))
    key = jax.random.key(seed + 100)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x + (b_std * jax.random.normal(jax.random.fold_in(key, hash(str(path)) % 1000), x.shape)
                             if str(path[-1].key) == lora.LORA_B else 0.0),
        tree,
    )  # fmt: skip


class Case:
    """The small checkpoint, its official model, two clips and their prompts, and the official base logits."""

    def __init__(self) -> None:
        self.dir = cached_small_checkpoint()
        self.config, self.params = load_pretrained(self.dir)
        self.torch_model = official.load_official(self.dir)
        clips = [speech.synth(speech.SHORT_EN), speech.synth(speech.MEDIUM_EN)]
        self.clips = clips
        self.features = official.official_features(clips, self.dir)
        lengths = [official.encoder_output_length(frames) for _, frames in self.features]
        self.input_ids, self.attention_mask = official.make_audio_prompt_ids(lengths, seed=3)
        self.input_features, self.feature_mask = official.pad_features(self.features)
        self.model = Qwen3ASR(self.config, attention_impl="xla")
        self._forward = jax.jit(lambda p, *a: self.model.apply({"params": p}, *a))
        self.base_logits = self.logits(self.params)

    def logits(self, params) -> np.ndarray:
        return np.asarray(self._forward(params, self.input_ids, self.attention_mask, self.input_features,
                                        self.feature_mask))  # fmt: skip

    def error(self, ours: np.ndarray, ref: np.ndarray) -> float:
        valid = self.attention_mask.astype(bool)
        return max(rel_max_error(ours[i][valid[i]], ref[i][valid[i]]) for i in range(len(ours)))

    def official_logits(self, torch_model) -> np.ndarray:
        return official.official_logits(torch_model, self.input_ids, self.attention_mask, self.features)


@pytest.fixture(scope="module")
def case() -> Case:
    return Case()


def peft_on_official(case: Case, adapter_dir: str):
    """The official model with a peft adapter dir loaded (``PeftModel.from_pretrained``), its windows wired in."""
    from peft import PeftModel

    base = official.load_official(case.dir)
    return PeftModel.from_pretrained(base, adapter_dir).eval().base_model.model


def test_our_adapter_loads_with_peft_on_the_official_model_and_gives_our_logits(case: Case, tmp_path):
    tree = random_adapter(case.config, SPEC, seed=1)
    ours = case.logits(lora.combine(case.params, tree, SPEC.scale))
    change = case.error(ours, case.base_logits)
    out = lora.save_peft(tmp_path / "adapter", case.config, tree, SPEC.rank, SPEC.alpha)
    saved = json.loads(Path(out, lora.CONFIG_FILE).read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 8.0
    assert "thinker.model.layers.1.mlp.down_proj" in saved["target_modules"]
    assert "thinker.audio_tower.layers.0.self_attn.out_proj" in saved["target_modules"]
    reference = case.official_logits(peft_on_official(case, out))
    error = case.error(ours, reference)
    print(f"adapter moves the logits by {change:.3f} std; ours vs official+peft: {error:.2e}")
    assert change > 0.5  # the adapter matters
    assert error <= TOL

    # Broken variants of the same files: a wrong scaling, and A written in the wrong element order.
    from safetensors.numpy import load_file, save_file

    scaled = tmp_path / "wrong_scaling"
    shutil.copytree(out, scaled)
    config = dict(saved, lora_alpha=saved["lora_alpha"] * 1.5)
    (scaled / lora.CONFIG_FILE).write_text(json.dumps(config))
    scaled_error = case.error(ours, case.official_logits(peft_on_official(case, str(scaled))))
    order = tmp_path / "wrong_layout"
    shutil.copytree(out, order)
    tensors = load_file(str(order / lora.WEIGHTS_FILE))
    for key, value in tensors.items():
        if ".lora_A." in key:  # [rank, in] filled from the kernel-layout [in, rank] without transposing
            tensors[key] = np.ascontiguousarray(value.T.reshape(value.shape))
    save_file(tensors, str(order / lora.WEIGHTS_FILE), metadata={"format": "pt"})
    order_error = case.error(ours, case.official_logits(peft_on_official(case, str(order))))
    print(f"wrong scaling: {scaled_error:.2e}; wrong A layout: {order_error:.2e}")
    assert scaled_error > 100 * TOL and order_error > 100 * TOL


def test_adapter_saved_by_peft_loads_here_with_its_logits(case: Case, tmp_path):
    """peft's get_peft_model + save_pretrained on the official model (random non-zero B, rsLoRA scaling, a rank
    pattern; both towers) → load_peft → our logits equal the official model's with that adapter."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    # init_lora_weights=False: B gets a Linear's default draw instead of zeros, so the adapter matters.
    config = LoraConfig(
        r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "o_proj", "out_proj", "down_proj", "fc1"],
        rank_pattern={"down_proj": 2}, use_rslora=True, init_lora_weights=False,
    )  # fmt: skip
    peft_model = get_peft_model(official.load_official(case.dir), config).eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    reference = case.official_logits(peft_model.base_model.model)
    adapter = lora.load_peft(tmp_path / "peft", case.config, name="domain")
    assert adapter.rank == 4 and adapter.name == "domain"
    ours = case.logits(lora.combine(case.params, adapter.weights))
    change, error = case.error(reference, case.base_logits), case.error(ours, reference)
    print(f"peft adapter moves the logits by {change:.3f} std; ours vs official+peft: {error:.2e}")
    assert change > 0.5
    assert error <= TOL

    # Its own round trip: written back (scale folded into B, alpha = r), it reloads with the same weights.
    again = lora.load_peft(lora.save_adapter(tmp_path / "again", case.config, adapter), case.config)
    for (path, x), (_, y) in zip(flatten_params(adapter.weights), flatten_params(again.weights)):
        np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-7, err_msg=str(path))


def test_merged_checkpoint_loaded_plain_equals_base_plus_adapter(case: Case, tmp_path):
    tree = random_adapter(case.config, SPEC, seed=2)
    adapted = case.logits(lora.combine(case.params, tree, SPEC.scale))
    merged = lora.merge_adapter(case.params, tree, SPEC.scale)
    out = export_pretrained(tmp_path / "merged", case.config, merged, case.dir, dtype="float32")
    _, loaded = load_pretrained(out)
    plain = case.logits(loaded)
    error, change = case.error(plain, adapted), case.error(adapted, case.base_logits)
    print(f"merged vs base+adapter: {error:.2e} (the adapter moves the logits by {change:.3f} std)")
    assert change > 0.5
    assert error <= TOL


def test_bad_adapters_are_named_errors(case: Case, tmp_path):
    tree = random_adapter(case.config, SPEC, seed=3)
    good = lora.save_peft(tmp_path / "good", case.config, tree, SPEC.rank, SPEC.alpha)

    # A rank in the config that the weights do not have.
    wrong_rank = tmp_path / "wrong_rank"
    shutil.copytree(good, wrong_rank)
    config = json.loads((wrong_rank / lora.CONFIG_FILE).read_text())
    (wrong_rank / lora.CONFIG_FILE).write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(AdapterError, match=r"rank 4 in the weights, 8 in adapter_config.json"):
        lora.load_peft(wrong_rank, case.config)

    # An adapter of a base with another hidden size.
    other = official.small_asr_config(text={"hidden_size": 96})
    from qasr_jax.config import config_from_dict

    other_config = config_from_dict(other)
    other_dir = lora.save_peft(tmp_path / "other", other_config, lora.init_adapters(other_config, SPEC,
                               jax.random.key(0)), SPEC.rank, SPEC.alpha)  # fmt: skip
    with pytest.raises(AdapterError, match=r"another base model"):
        lora.load_peft(other_dir, case.config)

    # Not an adapter dir; targets that select nothing; a name nobody loaded.
    with pytest.raises(AdapterError, match=r"adapter_config.json is missing"):
        lora.load_peft(tmp_path, case.config)
    with pytest.raises(AdapterError, match=r"match no projection"):
        lora.select_targets(case.config, ["model.layers.*.self_attn.qkv"])
    stack = lora.stack_adapters(case.config, [lora.load_peft(good, case.config, name="medical")])
    with pytest.raises(UnknownAdapterError, match=r"'legal' is not loaded \(loaded: \['medical'\]\)"):
        stack.slot("legal")


# --------------------------------------------------------------------------------------------------------------
# Several adapters in one batch


def test_mixed_adapter_batch_equals_each_adapter_alone(case: Case):
    """Rows with three different adapters and the base, in one prefill and one decode loop, give each row's
    tokens exactly and its log-probabilities and full-forward logits within the bar, as each adapter alone."""
    specs = [SPEC, lora.LoraSpec(targets=lora.DECODER_TARGETS, rank=2, alpha=4.0),
             lora.LoraSpec(targets=("q_proj", "v_proj"), rank=8, alpha=8.0)]  # fmt: skip
    loaded = [lora.Adapter(f"a{i}", _scaled(random_adapter(case.config, s, 10 + i), s), s.rank)
              for i, s in enumerate(specs)]  # fmt: skip
    stack = lora.stack_adapters(case.config, loaded)
    tokenizer = Tokenizer.from_pretrained(case.dir)
    clip = case.clips[1][: 3 * audio_io.SAMPLE_RATE]
    slots = [1, 2, 0, 3]

    def request(slot: int, i: int) -> DecodeRequest:
        wav = np.roll(clip, 800 * i)[: len(clip) - 1600 * i]
        tokens = case.config.audio.output_length(audio_io.num_frames(len(wav)))
        return DecodeRequest(wav, build_prompt_ids(tokenizer, tokens, "", None), 10, adapter=slot)

    requests = [request(slot, i) for i, slot in enumerate(slots)]
    engine = Engine(case.config, attention_impl="xla")
    mixed = engine.run(case.params, requests, adapters=stack)
    for i, (slot, r) in enumerate(zip(slots, requests)):
        params = case.params if slot == 0 else lora.combine(case.params, loaded[slot - 1].weights)
        alone = engine.run(params, [DecodeRequest(r.samples, r.prompt_ids, r.max_new_tokens)])[0]
        assert mixed[i].token_ids == alone.token_ids, (i, slot)
        np.testing.assert_allclose(mixed[i].logprobs, alone.logprobs, atol=1e-4)
    # Different adapters do decode differently here (else the equality above would say little).
    assert len({tuple(mixed[i].token_ids) for i in (0, 1, 2, 3)}) >= 3

    # The full forward pass with per-row adapters (encoder windows included) against each adapter alone.
    rows = jnp.asarray([1, 3])
    per_row = case.logits(lora.combine(case.params, lora.select_rows(stack.weights, rows)))
    for i, slot in enumerate([1, 3]):
        alone = case.logits(lora.combine(case.params, loaded[slot - 1].weights))
        assert case.error(per_row[i : i + 1], alone[i : i + 1]) <= TOL
        assert case.error(alone[i : i + 1], case.base_logits[i : i + 1]) > 0.1


def _scaled(tree: dict, spec: lora.LoraSpec) -> dict:
    """A trained tree as a loaded ``Adapter`` holds it: the scale folded into B."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * spec.scale if str(path[-1].key) == lora.LORA_B else x, tree
    )
