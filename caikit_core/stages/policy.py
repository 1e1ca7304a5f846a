"""``policy``: the RL policy optimised against the preference model (RL-CAI).

Starts from the SFT checkpoint (or ``models.policy``), which is also the KL
reference; PPO-style optimisers use the reward, DPO-style ones the labelled pairs.
With ``rl.rollouts = "generator"`` the run's generator plugin is built on the policy
and handed to the optimiser (``rollouts=``) to sample from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from caikit_core.config import RunConfig
from caikit_core.interfaces import FitReport
from caikit_core.stages.base import Context, Stage, StageResult
from caikit_core.stages.labels import labelled
from caikit_core.stages.preference_model import metric_line
from caikit_core.store import fingerprint


class Policy(Stage):
    name = "policy"
    phase = "rl"
    kind = "fit"
    inputs = ("preference_model", "labels")
    roles = ("policy_optimiser",)

    @classmethod
    def included(cls, config: RunConfig) -> bool:
        return "rl" in config.phases and config.rl.train_policy

    def input_fingerprint(self, ctx: Context) -> str:
        return fingerprint(
            [ctx.fingerprints[n] for n in self.inputs], what="the policy stage inputs"
        )

    def settings(self, ctx: Context) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "policy": ctx.rl_policy()[1],
            "prompts": ctx.fingerprints["prompts"],
            "labels": ctx.fingerprints["labels"],
        }
        if ctx.config.rl.rollouts == "generator":  # absent by default: old fingerprints hold
            generator = ctx.role("generator")
            settings["rollouts"] = {"plugin": generator.plugin, "settings": generator.options()}
        return settings

    def models(self, ctx: Context) -> dict[str, str]:
        policy = ctx.rl_policy()[0]
        return {"policy": policy, "reference": policy}

    def fit(self, ctx: Context, out: Path) -> FitReport:
        role = ctx.role("policy_optimiser")
        optimiser = role.spec().build(role.config)
        pm_role = ctx.role("preference_model")
        reward = pm_role.spec().build(pm_role.config, model=ctx.model("preference"))
        reward.load(ctx.artifacts["preference_model"])
        policy = ctx.rl_policy()[0]
        resume = ctx.fit_options(optimiser)
        if ctx.config.rl.rollouts == "optimiser":
            report: FitReport = optimiser.optimise(
                policy, policy, reward, ctx.rows("prompts"), labelled(ctx), out, **resume
            )
            return report
        generator_role = ctx.role("generator")
        rollouts = generator_role.spec().build(generator_role.config, model=policy)
        try:
            report = optimiser.optimise(
                policy,
                policy,
                reward,
                ctx.rows("prompts"),
                labelled(ctx),
                out,
                rollouts=rollouts,
                **resume,
            )
        finally:
            close = getattr(rollouts, "close", None)
            if callable(close):
                close()
        return report

    def summary(self, ctx: Context, result: StageResult) -> list[str]:
        lines = metric_line(self.name, result)
        for step, row in enumerate(result.history):
            reward = row.get("objective/scores", row.get("reward"))
            kl = row.get("objective/kl", row.get("kl"))
            if reward is not None or kl is not None:
                lines.append(f"  step {step}: reward {reward}, KL {kl}")
        if result.artifact is not None:
            lines.append(f"RL-CAI policy checkpoint: {result.artifact}")
        return lines
