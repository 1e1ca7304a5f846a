"""Hugging Face Llama checkpoints in and out of JAX (Tunix's ``Llama3`` with caikit's shims).

- :func:`model_config` reads a checkpoint's ``config.json`` and refuses what the
  backend does not implement (another architecture, a RoPE scaling type, biases)
  before any weight is read.
- :func:`load_model` builds a :class:`~caikit_jax.shims.CaikitLlama3` on a device
  mesh from the checkpoint's safetensors.
- :func:`save_checkpoint` writes the weights back as a Hugging Face folder
  (safetensors, config, tokenizer) that transformers loads, so a JAX-trained
  policy runs in the ``hf`` generator.
- :func:`forward_inputs`, :func:`hidden_states` and :func:`token_logprobs` are the
  pieces the trainers share.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from caikit_core.errors import PluginError
from caikit_core.models import PICKLE_SUFFIXES

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_ROPE_TYPES",
    "check_device",
    "forward_inputs",
    "hidden_states",
    "load_model",
    "make_mesh",
    "model_config",
    "param_dtype",
    "place_on_mesh",
    "read_tokenizer",
    "save_checkpoint",
    "save_tensors",
    "token_logprobs",
    "versions",
]

#: The Hugging Face architectures the JAX backend runs.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
#: RoPE types it implements (``"default"``: plain rotary embeddings with ``rope_theta``).
SUPPORTED_ROPE_TYPES = ("default",)
#: Files copied from the source checkpoint next to the saved weights.
_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PluginError(
            f"{path}: no config.json; expected a Hugging Face checkpoint folder"
        ) from None
    except (OSError, ValueError) as exc:
        raise PluginError(f"{path}: cannot read the model config: {exc}") from exc
    if not isinstance(loaded, dict):
        raise PluginError(f"{path}: expected a JSON object")
    return loaded


def _rope(config: dict[str, Any], path: Path) -> float:
    """The checkpoint's RoPE theta; any scaling scheme is refused, never ignored."""
    params = config.get("rope_parameters")
    legacy = config.get("rope_scaling")
    if isinstance(params, dict):
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    else:
        rope_type = "default"
        if isinstance(legacy, dict):
            rope_type = legacy.get("rope_type", legacy.get("type", "default"))
        theta = config.get("rope_theta", 10000.0)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise PluginError(
            f"{path}: RoPE scaling type {rope_type!r} is not implemented by the jax backend "
            f"(it implements {', '.join(repr(t) for t in SUPPORTED_ROPE_TYPES)}); use the torch "
            "backend for this checkpoint"
        )
    return float(theta)


def model_config(
    folder: str | Path, *, architectures: tuple[str, ...] = SUPPORTED_ARCHITECTURES
) -> Any:
    """Tunix's ``ModelConfig`` for the checkpoint in ``folder``.

    :raises PluginError: naming the file, for an architecture other than
        :data:`SUPPORTED_ARCHITECTURES`, a RoPE scaling type other than
        :data:`SUPPORTED_ROPE_TYPES`, attention or MLP biases, or an activation other
        than SiLU.
    """
    from tunix.models.llama3 import model as llama3

    folder = Path(folder)
    path = folder / "config.json"
    config = _read_config(folder)
    found = config.get("architectures") or [config.get("model_type", "unknown")]
    unsupported = [a for a in found if a not in architectures]
    if unsupported:
        raise PluginError(
            f"{path}: architecture {', '.join(map(str, unsupported))} is not supported by the "
            f"jax backend (supported: {', '.join(architectures)}); use the torch "
            "backend for this checkpoint"
        )
    theta = _rope(config, path)
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise PluginError(f"{path}: {key} = true is not implemented by the jax backend")
    if config.get("hidden_act", "silu") != "silu":
        raise PluginError(
            f"{path}: hidden_act {config['hidden_act']!r} is not implemented by the jax "
            "backend (it implements 'silu')"
        )
    heads = int(config["num_attention_heads"])
    return llama3.ModelConfig(
        num_layers=int(config["num_hidden_layers"]),
        vocab_size=int(config["vocab_size"]),
        embed_dim=int(config["hidden_size"]),
        hidden_dim=int(config["intermediate_size"]),
        num_heads=heads,
        head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        rope_theta=theta,  # Tunix annotates int; it is used as a float
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        weight_tying=bool(config.get("tie_word_embeddings", False)),
    )


def check_device(device: str, who: str) -> None:
    """Refuse ``device = "cuda"`` when JAX has no GPU backend (never fall back silently)."""
    if device == "cuda" and jax.default_backend() != "gpu":
        raise PluginError(
            f"{who}: device = 'cuda' but JAX's default backend is {jax.default_backend()!r}; "
            "install a CUDA build of jaxlib or use device = 'auto'"
        )


def param_dtype(dtype: str) -> Any:
    """The weights' dtype for a config's ``dtype`` (``"auto"`` and ``"float32"``: float32)."""
    return jnp.bfloat16 if dtype == "bfloat16" else jnp.float32


def make_mesh(devices: int | None = None) -> jax.sharding.Mesh:
    """An ``(fsdp, tp)`` mesh over ``devices`` devices (all visible ones by default),
    sharding parameters fully (FSDP) along the first axis."""
    from caikit_jax.shims import auto_mesh

    count = devices if devices is not None else jax.device_count()
    return auto_mesh((count, 1), ("fsdp", "tp"))


def place_on_mesh(mesh: jax.sharding.Mesh, *objects: Any) -> None:
    """Lay out the state of nnx ``objects`` (a model, its optimizer, a new head) on
    ``mesh`` by their sharding annotations, before the first jitted step.

    A freshly built optimizer state or head lives on one device; the state a jitted
    step returns is laid out on the mesh, so without this the second step sees new
    input shardings and compiles the step again (Tunix's ``PeftTrainer`` shards its
    optimizer for the same reason). On a one-device mesh XLA returns every array
    replicated (``P()``), whatever its annotation, so that is the layout given there.
    On a larger mesh the state is laid out by its annotations; XLA's output layouts
    can still differ from them in equivalent ways (``P('tp', 'fsdp')`` comes back as
    ``P(None, 'fsdp')`` when ``tp`` has one device), and the step then compiles a
    second time, once per fit.
    """
    from flax import nnx

    if mesh.devices.size == 1:
        spec: Any = jax.sharding.PartitionSpec
        replicated = jax.sharding.NamedSharding(mesh, spec())
        for obj in objects:
            nnx.update(obj, jax.device_put(nnx.state(obj), replicated))
        return
    constrain: Any = jax.lax.with_sharding_constraint
    with mesh:
        for obj in objects:
            state = nnx.state(obj)
            nnx.update(obj, constrain(state, nnx.get_partition_spec(state)))


def load_model(
    folder: str | Path,
    *,
    mesh: jax.sharding.Mesh | None = None,
    dtype: Any = jnp.float32,
    remat: bool = False,
    trunk_only: bool = False,
    architectures: tuple[str, ...] = SUPPORTED_ARCHITECTURES,
) -> Any:
    """Load the checkpoint in ``folder`` as a sharded :class:`CaikitLlama3`.

    :param remat: recompute each decoder layer's activations in the backward pass.
    :param trunk_only: build no output projection (``lm_head``) and skip it in the
        file, for a preference model's trunk; the model's logits are then meaningless.
    :param architectures: the checkpoint architectures to accept.
    """
    import dataclasses

    from tunix.models import safetensors_loader
    from tunix.models.llama3 import model as llama3
    from tunix.models.llama3 import params as llama3_params

    from caikit_jax.shims import CaikitLlama3, tracer_sharding_without_origin

    folder = Path(folder)
    config = model_config(folder, architectures=architectures)
    if trunk_only:
        config = dataclasses.replace(config, weight_tying=True)
    if remat:
        config = dataclasses.replace(config, remat_config=llama3.RematConfig.DECODER)
    if not list(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:  # there is no allow_pickle here: Tunix's loader reads safetensors only
            raise PluginError(
                f"{folder}: holds its weights only as pickle ({', '.join(pickles[:4])}), and "
                "the jax backend reads *.safetensors only (it never unpickles, so allow_pickle "
                "does not apply); convert the folder to safetensors"
            )
        raise PluginError(f"{folder}: no *.safetensors weights (the jax backend reads safetensors)")
    with tracer_sharding_without_origin():  # builds the model under nnx.eval_shape
        return safetensors_loader.load_and_create_model(
            file_dir=str(folder),
            model_class=CaikitLlama3,
            config=config,
            # Tunix's own HF -> nnx key mapping (private in 0.1.7, hence the pin).
            key_mapping=llama3_params._get_key_and_transform_mapping,
            mesh=mesh if mesh is not None else make_mesh(),
            dtype=dtype,
        )


def _hf_tensors(model: Any) -> dict[str, np.ndarray]:
    """The model's weights under Hugging Face Llama names and layouts (float32)."""
    cfg = model.config
    d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def arr(x: Any) -> np.ndarray:
        return np.asarray(jax.device_get(x.value if hasattr(x, "value") else x), dtype=np.float32)

    out: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": arr(model.embedder.input_embedding),
        "model.norm.weight": arr(model.final_norm.w),
    }
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        attn, mlp = layer.attn, layer.mlp
        out[p + "self_attn.q_proj.weight"] = arr(attn.q_proj.w).reshape(d, n * h).T
        out[p + "self_attn.k_proj.weight"] = arr(attn.k_proj.w).reshape(d, k * h).T
        out[p + "self_attn.v_proj.weight"] = arr(attn.v_proj.w).reshape(d, k * h).T
        out[p + "self_attn.o_proj.weight"] = arr(attn.o_proj.w).reshape(n * h, d).T
        out[p + "mlp.gate_proj.weight"] = arr(mlp.gate_proj.kernel).T
        out[p + "mlp.up_proj.weight"] = arr(mlp.up_proj.kernel).T
        out[p + "mlp.down_proj.weight"] = arr(mlp.down_proj.kernel).T
        out[p + "input_layernorm.weight"] = arr(layer.input_layernorm.w)
        out[p + "post_attention_layernorm.weight"] = arr(layer.post_attention_layernorm.w)
    if not cfg.weight_tying:
        out["lm_head.weight"] = arr(model.lm_head.w).T
    return {name: np.ascontiguousarray(value) for name, value in out.items()}


def save_tensors(
    model: Any,
    out: str | Path,
    *,
    source: str | Path,
    extra: dict[str, np.ndarray] | None = None,
    config_updates: dict[str, Any] | None = None,
    with_lm_head: bool = True,
) -> Path:
    """Write ``model``'s weights (float32 safetensors, Hugging Face names), plus
    ``extra`` tensors, with ``source``'s config (updated by ``config_updates``) and
    tokenizer files, to ``out``."""
    from safetensors.numpy import save_file

    out, source = Path(out), Path(source)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _hf_tensors(model)
    if not with_lm_head:
        tensors.pop("lm_head.weight", None)
    tensors.update(extra or {})
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = _read_config(source)
    config["dtype"] = "float32"
    config.pop("torch_dtype", None)
    config.update(config_updates or {})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for name in _SIDE_FILES:
        if (source / name).is_file() and source.resolve() != out.resolve():
            shutil.copyfile(source / name, out / name)
    return out


def save_checkpoint(model: Any, out: str | Path, *, source: str | Path) -> Path:
    """Write ``model`` to ``out`` as a Hugging Face causal-LM checkpoint.

    ``config.json`` and the tokenizer files are copied from ``source``, the
    checkpoint the model was loaded from, so transformers and caikit's ``hf``
    generator load ``out`` as they load ``source``.
    """
    return save_tensors(model, out, source=source)


def read_tokenizer(folder: Path, *, who: str) -> Any:
    """The checkpoint's tokenizer (transformers), with a pad token and a chat template."""
    from transformers import AutoTokenizer

    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise PluginError(f"{who}: cannot load the tokenizer of {folder}: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise PluginError(f"{who}: the tokenizer of {folder} has no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def versions() -> dict[str, str]:
    """The versions of the JAX stack, for records."""
    from importlib.metadata import version

    import flax
    import optax

    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "tunix": version("google-tunix"),
    }


def forward_inputs(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Positions and the ``[B, T, T]`` attention mask for a (left- or right-) padded batch.

    Positions count real tokens only, so a left-padded sequence has the positions it
    would have unpadded (as transformers computes them from the attention mask).
    """
    mask = mask.astype(jnp.bool_)
    positions = jnp.clip(jnp.cumsum(mask, axis=-1) - 1, 0, None)
    t = mask.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=jnp.bool_))
    attention = causal[None, :, :] & mask[:, None, :]
    return positions, attention


def hidden_states(model: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """The final-norm hidden states ``[B, T, D]`` of ``model``'s trunk."""
    from caikit_jax.shims import trunk

    positions, attention = forward_inputs(mask)
    return trunk(model, ids, positions, attention)


def logits(model: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Next-token logits ``[B, T, V]``."""
    positions, attention = forward_inputs(mask)
    out: jax.Array = model(ids, positions, None, attention)[0]
    return out


def token_logprobs(model: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """``log p(ids[:, t] | ids[:, :t])`` for t >= 1, as ``[B, T - 1]`` (float32)."""
    scores = logits(model, ids, mask).astype(jnp.float32)[:, :-1]
    logp = jax.nn.log_softmax(scores, axis=-1)
    return jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
