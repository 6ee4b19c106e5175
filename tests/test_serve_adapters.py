"""Adapters through the Python API and ``python -m infer serve --adapters``: per-item adapters in one call give
each item's text as that adapter alone gives it, and the OpenAI ``model`` field picks an adapter (or the base)
with the same texts; unknown names are refused with their name."""

from __future__ import annotations

import concurrent.futures

import httpx
import jax
import openai
import pytest

from qasr_jax import adapters as lora
from qasr_jax.asr import Qwen3ASRModel
from qasr_jax.errors import UnknownAdapterError
from qasr_jax.weights import load_pretrained
from tests.support.server import running_server, speech_file
from tests.test_asr import cached_small_checkpoint

MAX_NEW = 24
KEY = "adapter-key-0123456789"
SPEC = lora.LoraSpec(targets=lora.DECODER_TARGETS, rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The small checkpoint, two adapter dirs whose B matters, a clip, and the model with both loaded."""
    checkpoint = cached_small_checkpoint()
    config, _ = load_pretrained(checkpoint)
    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for i, name in enumerate(("medical", "legal")):
        tree = lora.init_adapters(config, SPEC, jax.random.key(i))
        tree = jax.tree_util.tree_map(lambda x, i=i: x + 0.5 * jax.random.normal(jax.random.key(20 + i), x.shape),
                                      tree)  # fmt: skip
        dirs[name] = lora.save_peft(root / name, config, tree, SPEC.rank, SPEC.alpha)
    model = Qwen3ASRModel.from_pretrained(checkpoint, max_new_tokens=MAX_NEW, adapters=dirs)
    return {"checkpoint": checkpoint, "dirs": dirs, "model": model, "clip": speech_file(4.0, seed=7)}


def test_per_item_adapters_in_one_call_equal_each_adapter_alone(setup):
    model, clip = setup["model"], setup["clip"]
    names = ["medical", "legal", None, "legal"]
    mixed = model.transcribe([clip] * 4, language="English", adapter=names)
    alone = {name: model.transcribe(clip, language="English", adapter=name)[0] for name in set(names)}
    for name, result in zip(names, mixed):
        assert result.token_ids == alone[name].token_ids, name
        assert result.text == alone[name].text
    texts = {name: r.token_ids for name, r in alone.items()}
    assert len({tuple(t) for t in texts.values()}) == 3, texts  # the adapters change what is written
    with pytest.raises(UnknownAdapterError, match=r"'finance' is not loaded"):
        model.transcribe(clip, adapter="finance")


def test_server_model_field_picks_an_adapter_and_keeps_the_base(setup):
    model, clip = setup["model"], setup["clip"]
    expected = {name: model.transcribe(clip, adapter=name if name != "qwen3-asr" else None)[0].text
                for name in ("medical", "legal", "qwen3-asr")}  # fmt: skip
    adapters = [f"{name}={path}" for name, path in setup["dirs"].items()]
    args = ("--max-batch", "4", "--max-new-tokens", str(MAX_NEW), "--adapters", *adapters)
    with running_server(setup["checkpoint"], *args, env={"QASR_API_KEY": KEY}) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=300, max_retries=0)
        listed = [m.id for m in client.models.list().data]
        assert listed == ["qwen3-asr", "medical", "legal"]
        order = ["medical", "legal", "qwen3-asr", "legal", "medical", "qwen3-asr"]

        def ask(name: str) -> str:
            with open(clip, "rb") as f:
                return client.audio.transcriptions.create(model=name, file=f).text

        with concurrent.futures.ThreadPoolExecutor(len(order)) as pool:
            texts = list(pool.map(ask, order))
        assert texts == [expected[name] for name in order]
        with open(clip, "rb") as f:
            reply = httpx.post(server.url + "/v1/audio/transcriptions", files={"file": f},
                               data={"model": "finance"}, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)  # fmt: skip
        assert reply.status_code == 404
        assert "finance" in reply.json()["error"]["message"] and reply.json()["error"]["code"] == "model_not_found"
