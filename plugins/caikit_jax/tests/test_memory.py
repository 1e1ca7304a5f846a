"""What the jax plugins hold in memory, counted in live arrays (:mod:`caikit_jax.memory`),
and the persistent compilation cache (:mod:`caikit_jax.compilation`).

Counts, not RSS: a model copy is a whole set of arrays with the tiny model's parameter
shapes, so a change that keeps one more copy (a model, an optimiser moment) fails here.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tunix")

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from caikit_core.records import Sample
from caikit_core.testing.checks import marker_set, toy_traces
from caikit_core.testing.tiny_models import build_tiny_llama
from caikit_jax.compilation import CACHE_ENV, COMPILE_METRIC, CompileClock, cache_folder
from caikit_jax.memory import Signature, model_copies, signature, state_bytes
from caikit_jax.model import load_model, make_mesh, place_on_mesh
from caikit_jax.optimiser import JaxOptimiser
from caikit_jax.plugin import JaxPreferenceConfig
from caikit_jax.reward import JaxPreferenceModel
from caikit_jax.sft import sft_step
from caikit_jax.tests.test_optimiser import sft_config
from caikit_jax.tests.test_ppo import FractionalLengthReward, _config, _prompts

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("jax-memory") / "tiny")


@pytest.fixture(scope="module")
def signatures(tiny: Path) -> tuple[Signature, Signature, Signature]:
    """The tiny model's parameters: all of them, the trunk's, and the untied ``lm_head``'s."""
    model = load_model(tiny, mesh=make_mesh())
    sig = signature(model)
    head = ((model.config.embed_dim, model.config.vocab_size), "float32")
    assert sig[head] == 1 and not model.config.weight_tying
    del model
    gc.collect()
    trunk = Counter(sig)
    del trunk[head]
    return sig, trunk, Counter({head: 1})


class CountingReward(FractionalLengthReward):
    """Counts the model copies alive each time PPO asks for scores (after a rollout)."""

    def __init__(self, trunk: Signature, head: Signature) -> None:
        super().__init__()
        self.trunk, self.head = trunk, head
        self.copies: list[tuple[int, int]] = []

    def score(self, samples: Sequence[Sample]) -> list[float]:
        self.copies.append((model_copies(self.trunk), model_copies(self.head)))
        return super().score(samples)


def test_ppo_holds_the_copies_its_design_needs_and_frees_them(
    tiny: Path, signatures: Any, tmp_path: Path
) -> None:
    sig, trunk, head = signatures
    gc.collect()
    assert model_copies(sig) == 0
    reward = CountingReward(trunk, head)
    report = JaxOptimiser(_config()).optimise(
        str(tiny), str(tiny), reward, _prompts(), [], tmp_path / "ppo"
    )
    # the trunk and lm_head: the actor + its two AdamW moments, and the reference. The
    # critic is a head on the actor's own trunk, its optimiser over the head alone
    # (shims item 4: as Tunix's own copy of the actor, (7, 4)); Tunix's anchor snapshot
    # of the actor, which PPO never reads, is dropped (item 8: with it, (8, 5) then)
    assert reward.copies == [(4, 4), (4, 4)]
    # nothing is left for the next stage (without memory.release: 6 copies until a gc)
    assert model_copies(sig) == 0
    assert report.metrics[COMPILE_METRIC] > 0


def test_sft_step_donates_the_old_weights_and_moments(tiny: Path, signatures: Any) -> None:
    sig, _, _ = signatures
    gc.collect()
    mesh = make_mesh()
    model = load_model(tiny, mesh=mesh)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    place_on_mesh(mesh, model, optimizer)
    old = [a for a in jax.tree_util.tree_leaves(nnx.state((model, optimizer))) if a.size > 1]
    ids = jnp.ones((2, 16), dtype=jnp.int32)
    loss_mask = jnp.zeros((2, 16), dtype=jnp.int32).at[:, 8:].set(1)
    float(sft_step(model, optimizer, ids, jnp.ones_like(ids), loss_mask))
    assert old and all(a.is_deleted() for a in old)
    assert model_copies(sig) == 3  # the model and its two moments, never two generations
    assert state_bytes(optimizer.opt_state) >= 2 * state_bytes(model, nnx.Param)


def test_sft_frees_the_model_and_its_optimiser(tiny: Path, signatures: Any, tmp_path: Path) -> None:
    sig, _, _ = signatures
    gc.collect()
    optimiser = JaxOptimiser(sft_config(learning_rate=1e-2, max_steps=2, batch_size=4))
    report = optimiser.sft(str(tiny), toy_traces(), tmp_path / "sft")
    assert model_copies(sig) == 0
    assert report.metrics[COMPILE_METRIC] > 0


def test_the_preference_models_compile_time_counts_the_scoring_after_training(
    tiny: Path, tmp_path: Path
) -> None:
    """``time/compile`` is all the compiling the stage did: the scoring of the
    comparisons after training compiles a forward pass per batch width, which the
    metric left out before (6-13 s of the quickstart's preference-model stage)."""
    # batches of 3 rows: shapes no other test compiles, so scoring compiles here
    pm = JaxPreferenceModel(
        JaxPreferenceConfig(max_steps=1, batch_size=3, max_length=96, eval_fraction=0.0),
        str(tiny),
    )
    with CompileClock() as everything:
        report = pm.fit(marker_set(3), tmp_path / "pm")
    assert everything.seconds > 0
    assert report.metrics[COMPILE_METRIC] == pytest.approx(everything.seconds, rel=1e-9)


_COMPILE = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp
    from caikit_jax.compilation import CompileClock, use_persistent_cache
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None
    )
    folder = use_persistent_cache()
    with CompileClock() as clock:
        jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()
    print(json.dumps({"folder": str(folder), "hits": len(hits), "seconds": clock.seconds}))
    """
)


def _python(script: str, *args: str, env: dict[str, str], unset: Sequence[str] = ()) -> Any:
    """Run ``script`` in a fresh interpreter that imports this checkout; the JSON of
    the last line it prints. ``unset`` names variables left out of its environment."""
    import json

    path = os.pathsep.join([str(ROOT), str(ROOT / "plugins")])
    inherited = {k: v for k, v in os.environ.items() if k not in unset}
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        env={**inherited, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _compile_in_subprocess(env: dict[str, str]) -> dict[str, Any]:
    result: dict[str, Any] = _python(_COMPILE, env=env)
    return result


def test_a_second_process_loads_its_compiled_steps_from_the_cache(tmp_path: Path) -> None:
    env = {
        CACHE_ENV: str(tmp_path / "xla"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_COMPILATION_CACHE_DIR": "",
    }
    first = _compile_in_subprocess(env)
    assert first["folder"] == str(tmp_path / "xla") and first["hits"] == 0
    assert first["seconds"] > 0 and any((tmp_path / "xla").iterdir())
    second = _compile_in_subprocess(env)
    assert second["hits"] > 0  # every executable the first compiled, loaded


def test_the_cache_folder_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("CAIKIT_CACHE", str(tmp_path))
    assert cache_folder() == tmp_path / "jax-compilation"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_folder() == tmp_path / "mine"
    for off in ("off", "0", "False", "no"):
        monkeypatch.setenv(CACHE_ENV, off)
        assert cache_folder() is None


# Frees 32 blocks of 8 MiB after glibc's threshold for mapping a block of its own has
# risen to 16 MiB (as it does once a mapped block that size is freed), each with a small
# block kept after it so the heap cannot shrink; prints the bytes of RSS the process keeps.
_FRAGMENT = textwrap.dedent(
    """
    import ctypes, json, os, sys
    from caikit_jax import allocator
    tuned = allocator.tune() if sys.argv[1] in ("tune", "restore") else None
    if sys.argv[1] == "restore":
        allocator.restore()
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    def block(size):
        address = libc.malloc(size)
        ctypes.memset(address, 1, size)
        return address
    libc.free(block(16 << 20))
    before = rss()
    blocks, kept = [], []
    for _ in range(32):
        blocks.append(block(8 << 20))
        kept.append(block(4096))
    for address in blocks:
        libc.free(address)
    print(json.dumps({"tuned": tuned, "kept": rss() - before}))
    """
)


def _fragment(arm: str, **env: str) -> dict[str, Any]:
    # glibc reads these at start-up (an empty value counts as 0): none of them set
    unset = ("CAIKIT_JAX_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES")
    result: dict[str, Any] = _python(_FRAGMENT, arm, env=env, unset=unset)
    return result


@pytest.mark.skipif(
    sys.platform != "linux" or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc only"
)
def test_the_tuned_allocator_gives_freed_blocks_back_to_the_system_until_restored() -> None:
    untouched = _fragment("keep")
    assert untouched["kept"] > 200 << 20  # glibc's default keeps the 256 MiB freed
    tuned = _fragment("tune")
    assert tuned["tuned"] is True and tuned["kept"] < 16 << 20
    # after the stage: blocks under 32 MiB come from the heap again (as glibc's default)
    restored = _fragment("restore")
    assert restored["tuned"] is True and restored["kept"] > 200 << 20
    opted_out = _fragment("tune", CAIKIT_JAX_MALLOC="keep")
    assert opted_out["tuned"] is False and opted_out["kept"] > 200 << 20


def test_jax_stages_tune_the_allocator_while_they_run(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from caikit_jax import allocator

    calls: list[str] = []
    monkeypatch.setattr(allocator, "tune", lambda: calls.append("tune") or True)
    monkeypatch.setattr(allocator, "restore", lambda: calls.append("restore"))
    JaxOptimiser(sft_config(max_steps=1, batch_size=2)).sft(
        str(tiny), toy_traces(), tmp_path / "sft"
    )
    assert calls == ["tune", "restore"]
