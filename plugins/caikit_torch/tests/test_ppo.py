"""caikit's PPO (``caikit_torch.ppo``): the maths by hand, and short runs on a tiny random Llama."""

from __future__ import annotations

import importlib.util
import json
import math
import string
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
if importlib.util.find_spec("caikit_torch") is None:  # not installed: use the source tree
    sys.path.insert(0, str(ROOT / "plugins"))

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402

import caikit_torch.ppo as ppo  # noqa: E402
from caikit_core.converter import InvalidValue  # noqa: E402
from caikit_core.errors import CaikitError, PluginError, TrainingStopped  # noqa: E402
from caikit_core.records import Conversation, conversation  # noqa: E402
from caikit_core.testing.tiny_models import TINY_CORPUS  # noqa: E402
from caikit_core.training.settings import PPOSettings  # noqa: E402
from caikit_torch.ppo import (  # noqa: E402
    METRIC_KEYS,
    PPO_RECORD,
    ROLLOUTS_FILE,
    KLController,
    PPOOptions,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    masked_whiten,
    train_ppo,
)

PROMPTS = [conversation(("user", text)) for text in TINY_CORPUS]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def lowercase_reward(convs: Sequence[Conversation], texts: Sequence[str]) -> list[float]:
    """0.1 per lowercase ASCII letter in the response."""
    assert len(convs) == len(texts)
    return [sum(ch in string.ascii_lowercase for ch in text) / 10 for text in texts]


def small(**overrides: object) -> PPOSettings:
    """Settings for a quick run on the tiny model."""
    base: dict[str, object] = {
        "steps": 3,
        "rollout_batch_size": 8,
        "mini_batch_size": 4,
        "epochs": 2,
        "learning_rate": 1e-3,
        "max_new_tokens": 8,
        "kl_coef": 0.05,
    }
    base.update(overrides)
    return PPOSettings(**base)  # type: ignore[arg-type]


def state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# --- the maths, by hand ---------------------------------------------------------------------


def test_gae_matches_a_hand_computed_example() -> None:
    # gamma 0.9, lam 0.8 (gamma * lam = 0.72), V = 0 after the last token.
    # row 0: t2: d = 2 - 0.25 = 1.75,            A2 = 1.75
    #        t1: d = 0 + 0.9 * 0.25 - 1 = -0.775, A1 = -0.775 + 0.72 * 1.75 = 0.485
    #        t0: d = 1 + 0.9 * 1 - 0.5 = 1.4,     A0 = 1.4 + 0.72 * 0.485 = 1.7492
    # row 1 (last token masked out: its reward and value are ignored):
    #        t1: d = 5 - 2 = 3,                   A1 = 3
    #        t0: d = 3 + 0.9 * 2 - 1 = 3.8,       A0 = 3.8 + 0.72 * 3 = 5.96
    rewards = torch.tensor([[1.0, 0.0, 2.0], [3.0, 5.0, 7.0]])
    values = torch.tensor([[0.5, 1.0, 0.25], [1.0, 2.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, 0.9, 0.8, mask=mask)
    torch.testing.assert_close(advantages, torch.tensor([[1.7492, 0.485, 1.75], [5.96, 3.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[2.2492, 1.485, 2.0], [6.96, 5.0, 0.0]]))


def test_gae_with_gamma_and_lambda_one_is_the_monte_carlo_return() -> None:
    rewards = torch.tensor([[0.5, -1.0, 2.0, 0.25]])
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    advantages, returns = gae(rewards, values, 1.0, 1.0)
    to_go = torch.tensor([[1.75, 1.25, 2.25, 0.25]])
    torch.testing.assert_close(returns, to_go)
    torch.testing.assert_close(advantages, to_go - values)


def test_clipped_policy_loss_matches_a_hand_computed_example() -> None:
    # token: ratio, A   -> -A*r,  -A*clip(r, 0.8, 1.2) -> max (clipped?)
    #   0:   1.5,  2    -> -3.0,  -2.4                 -> -2.4 (yes)
    #   1:   0.5,  1    -> -0.5,  -0.8                 -> -0.5 (no)
    #   2:   0.5, -1    ->  0.5,   0.8                 ->  0.8 (yes)
    #   3:   1.1, -3    ->  3.3,   3.3                 ->  3.3 (no)
    #   4:   masked out
    # loss = (-2.4 - 0.5 + 0.8 + 3.3) / 4 = 0.3, clipfrac = 2 / 4
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]])
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.1, 100.0]])
    logprobs = (old + ratios.log()).requires_grad_()
    advantages = torch.tensor([[2.0, 1.0, -1.0, -3.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    loss, clipfrac = clipped_policy_loss(logprobs, old, advantages, mask, 0.2)
    assert loss.item() == pytest.approx(0.3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)
    loss.backward()
    # d/dlogp of -A * r is -A * r / 4 where unclipped, 0 where clipped or masked.
    assert logprobs.grad is not None
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -0.125, 0.0, 0.825, 0.0]]))


def test_clipped_value_loss_matches_a_hand_computed_example() -> None:
    # v = 1, v_old = 0.5, clip range 0.2 -> clipped v = 0.7
    #   R = 2: (1 - 2)^2 = 1, (0.7 - 2)^2 = 1.69 -> 1.69 (clipped)
    #   R = 0: (1 - 0)^2 = 1, (0.7 - 0)^2 = 0.49 -> 1
    # loss = 0.5 * (1.69 + 1) / 2 = 0.6725, clipfrac = 1 / 2
    values = torch.tensor([[1.0, 1.0, 4.0]])
    old = torch.tensor([[0.5, 0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.0, -9.0]])
    mask = torch.tensor([[True, True, False]])
    loss, clipfrac = clipped_value_loss(values, old, returns, mask, 0.2)
    assert loss.item() == pytest.approx(0.6725)
    assert clipfrac.item() == pytest.approx(0.5)


def test_masked_whiten() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    # mean 2, unbiased variance 1 over the three masked-in values
    torch.testing.assert_close(
        masked_whiten(values, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        masked_whiten(values, mask, shift_mean=False),
        torch.tensor([[1.0, 2.0, 3.0, 0.0]]),
        atol=1e-6,
        rtol=0,
    )


def test_kl_controller() -> None:
    fixed = KLController(0.1)
    assert fixed.update(100.0, 8) == 0.1
    ctl = KLController(0.1, adaptive=True, target=6.0, horizon=100)
    assert ctl.update(12.0, 10) == pytest.approx(0.1 * 1.02)  # error +1 clipped to +0.2
    assert ctl.update(3.0, 10) == pytest.approx(0.1 * 1.02 * 0.98)  # -0.5 clipped to -0.2
    assert ctl.update(6.6, 10) == pytest.approx(0.1 * 1.02 * 0.98 * 1.01)  # +0.1
    assert ctl.update(6.0, 10) == pytest.approx(0.1 * 1.02 * 0.98 * 1.01)  # on target


def test_invalid_settings_and_inputs(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidValue, match=r"expected at most rollout_batch_size = 8, found 9"):
        PPOSettings(mini_batch_size=9)
    with pytest.raises(InvalidValue, match=r"expected a number > 0, found 0\.0"):
        PPOSettings(temperature=0.0)
    with pytest.raises(CaikitError, match=r"kl_horizon must be >= 1, got 0; device must be"):
        train_ppo(
            str(tiny_llama),
            str(tiny_llama),
            lowercase_reward,
            PROMPTS,
            small(),
            tmp_path / "out",
            options=PPOOptions(kl_horizon=0, device="tpu"),
        )
    with pytest.raises(CaikitError, match="no prompts"):
        train_ppo(str(tiny_llama), str(tiny_llama), lowercase_reward, [], small(), tmp_path)
    with pytest.raises(PluginError, match=r"reference folder .* does not exist"):
        train_ppo(
            str(tiny_llama), str(tmp_path / "nope"), lowercase_reward, PROMPTS, small(), tmp_path
        )
    with pytest.raises(CaikitError, match="returned 1 scores for 8 responses"):
        train_ppo(str(tiny_llama), str(tiny_llama), lambda c, t: [1.0], PROMPTS, small(), tmp_path)
    with pytest.raises(CaikitError, match="non-finite scores"):
        train_ppo(
            str(tiny_llama),
            str(tiny_llama),
            lambda c, t: [math.nan] * len(t),
            PROMPTS,
            small(),
            tmp_path,
        )


# --- short runs -------------------------------------------------------------------------------


def test_run_metrics_kl_and_checkpoint(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "ppo"
    seen: list[dict[str, float]] = []
    history = train_ppo(
        str(tiny_llama),
        str(tiny_llama),
        lowercase_reward,
        PROMPTS,
        small(steps=3),
        out,
        on_step=seen.append,
    )
    assert seen == history and len(history) == 3
    for metrics in history:
        assert set(METRIC_KEYS) <= set(metrics), set(METRIC_KEYS) - set(metrics)
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        assert metrics["beta"] == 0.05
        assert metrics["objective/rlhf_reward"] == pytest.approx(
            metrics["objective/scores"] + metrics["objective/non_score_reward"]
        )
        assert metrics["objective/non_score_reward"] == pytest.approx(
            -0.05 * metrics["objective/kl"], abs=1e-6
        )
        assert 0 < metrics["val/response_length"] <= 8
        assert min(metrics["time/generate"], metrics["time/score"], metrics["time/train"]) > 0
    # policy == reference before the first update: the KL is exactly zero
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert history[0]["objective/non_score_reward"] == pytest.approx(0.0, abs=1e-6)
    # ... and grows once the policy moves
    assert history[1]["objective/kl"] > 1e-3
    assert history[2]["objective/kl"] > 1e-3

    # the saved policy is a plain HF checkpoint (no value head) that differs from the base
    base, trained = state(tiny_llama), state(out)
    assert set(trained) == set(base)
    assert any(not torch.equal(base[k], trained[k]) for k in base)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template
    ids = tokenizer("hello there", return_tensors="pt")
    assert torch.isfinite(model(**ids).logits).all()
    record = json.loads((out / PPO_RECORD).read_text())
    assert record["steps_completed"] == 3 and record["stopped"] is None
    assert record["metrics"] == history
    # every sampled response, by step, beside the checkpoint
    rows = [json.loads(line) for line in (out / ROLLOUTS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [0] * 8 + [1] * 8 + [2] * 8
    assert {r["prompt"] for r in rows} <= {p[-1].content for p in PROMPTS}
    assert all(isinstance(r["response"], str) for r in rows)


def test_score_increases_with_a_simple_reward(tiny_llama: Path, tmp_path: Path) -> None:
    # 0.1 per lowercase letter; over seeds 0-4 these settings raise the mean of the last
    # three steps' scores above the first three's by 0.18 to 0.63 (seed 0: 1.05 -> 1.67).
    settings = small(
        steps=15,
        rollout_batch_size=16,
        mini_batch_size=8,
        epochs=4,
        learning_rate=3e-3,
        kl_coef=0.01,
    )
    history = train_ppo(
        str(tiny_llama), str(tiny_llama), lowercase_reward, PROMPTS, settings, tmp_path / "o"
    )
    scores = [m["objective/scores"] for m in history]
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last > first + 0.1, scores
    assert history[-1]["objective/kl"] > history[0]["objective/kl"] == pytest.approx(0, abs=1e-6)


def test_runs_are_deterministic_given_the_seed(tiny_llama: Path, tmp_path: Path) -> None:
    def run(seed: int, name: str) -> list[dict[str, float]]:
        history = train_ppo(
            str(tiny_llama),
            str(tiny_llama),
            lowercase_reward,
            PROMPTS,
            small(steps=2),
            tmp_path / name,
            options=PPOOptions(seed=seed),
        )
        return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in history]

    first = run(1, "a")
    assert run(1, "b") == first
    a, b = state(tmp_path / "a"), state(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert run(2, "c") != first


def test_adaptive_kl_moves_beta_towards_the_target(tiny_llama: Path, tmp_path: Path) -> None:
    # horizon 40, 8 samples a step: beta changes by at most 1 +- 0.2 * 8 / 40 = 1 +- 4% a step
    settings = small(steps=3, adaptive_kl=True, kl_coef=0.1, target_kl=1e-3)
    history = train_ppo(
        str(tiny_llama),
        str(tiny_llama),
        lowercase_reward,
        PROMPTS,
        settings,
        tmp_path / "o",
        options=PPOOptions(kl_horizon=40),
    )
    betas = [m["beta"] for m in history]
    kls = [m["objective/kl"] for m in history]
    assert kls[0] == pytest.approx(0, abs=1e-6) and kls[1] > 1e-3  # below, then above target
    assert betas[0] == 0.1
    assert betas[1] == pytest.approx(0.1 * 0.96)  # KL below the target: beta goes down
    assert betas[2] == pytest.approx(0.1 * 0.96 * 1.04)  # KL above the target: beta goes up
    # a fixed controller leaves beta alone
    fixed = train_ppo(
        str(tiny_llama),
        str(tiny_llama),
        lowercase_reward,
        PROMPTS,
        small(steps=2, kl_coef=0.1),
        tmp_path / "f",
    )
    assert [m["beta"] for m in fixed] == [0.1, 0.1]


def test_kl_bound_stops_with_a_loadable_checkpoint(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "stopped"
    seen: list[dict[str, float]] = []
    with pytest.raises(TrainingStopped) as caught:
        train_ppo(
            str(tiny_llama),
            str(tiny_llama),
            lowercase_reward,
            PROMPTS,
            small(steps=5, kl_bound=1e-3, learning_rate=3e-3),
            out,
            on_step=seen.append,
        )
    err = caught.value
    assert err.checkpoint == str(out)
    assert "step 1" in str(err) and "kl_bound = 0.001" in str(err)
    assert len(seen) == 1  # step 0 (KL 0) completed; step 1's rollout crossed the bound
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == transformers.AutoConfig.from_pretrained(tiny_llama).vocab_size
    assert any(not torch.equal(v, state(out)[k]) for k, v in state(tiny_llama).items())
    record = json.loads((out / PPO_RECORD).read_text())
    assert record["steps_completed"] == 1 and "kl_bound" in record["stopped"]


def test_non_finite_loss_stops_naming_step_and_mini_batch(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def nan_loss(
        logprobs: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return logprobs.sum() * math.nan, torch.tensor(0.0)

    monkeypatch.setattr(ppo, "clipped_policy_loss", nan_loss)
    with pytest.raises(
        TrainingStopped, match=r"non-finite loss .* step 0, PPO epoch 0, mini-batch 0"
    ):
        train_ppo(
            str(tiny_llama), str(tiny_llama), lowercase_reward, PROMPTS, small(), tmp_path / "n"
        )
