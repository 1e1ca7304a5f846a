"""Base test classes: one per role, one test per conformance check.

Subclass the class of your plugin's role in a test file, give it your plugin, and
pytest runs every check of :data:`~caikit_core.testing.checks.CHECKS` for that role
as its own test, ``test_<check name>``::

    import pytest
    from caikit_core.testing.base import BaseLabellerTests


    class TestMine(BaseLabellerTests):
        @pytest.fixture
        def plugin(self):
            return "mine"

The one fixture to override is ``plugin``; the others have working defaults (the
kit's settings, the tiny model, the ``hf`` generator on it, the default
constitution) and are there to be overridden when a plugin needs something else.
A check that does not apply (a capability the plugin does not declare) is skipped
with the reason; a check named in the class attribute ``expected_failed_checks``
(check name -> why) is a strict ``xfail``, so it fails once the bug is fixed.

The checks of one class share one built plugin (and what the checks cache, such as
a fitted model), for as long as ``plugin`` and ``plugin_config`` return the same
values. Importing this module imports pytest but not torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from caikit_core.testing.checks import CHECKS, Check, CheckContext, CheckSkipped
from caikit_core.testing.kit import make_context, unmet_requirement

__all__ = [
    "BaseCriticTests",
    "BaseExecutorTests",
    "BaseGeneratorTests",
    "BaseInstrumentTests",
    "BaseLabellerTests",
    "BasePolicyOptimiserTests",
    "BasePreferenceModelTests",
    "BaseRoleTests",
]

#: What a built instance of each role must provide, for the ``plugin`` contract.
_INSTANCE_CONTRACT = {
    "generator": "generate(requests) -> list[Generation] (and score(requests) -> list[Score] "
    "with the 'score' capability)",
    "critic": "revise(samples, *, seed) -> list[RevisionTrace]",
    "labeller": "label(comparisons, *, seed) -> list[PreferenceLabel]",
    "preference_model": "fit(labelled, out) -> FitReport, load(path) and "
    "score(samples) -> list[float]",
    "policy_optimiser": "sft(policy, examples, out) -> FitReport and/or "
    "optimise(policy, reference, reward, prompts, labelled, out) -> FitReport",
    "executor": "map(worker_spec, keyed_batches, *, total, describe) -> Iterator[(key, list)]",
    "instrument": "requires (a frozenset) and evaluate(ctx) -> EvalResult",
}


def _identity(value: Any) -> Any:
    """A key that is equal for equal names and configs, and for the same object."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return ("dict", repr(sorted(value.items())))
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return ("value", type(value), value)


def _make_test(check: Check) -> Callable[..., None]:
    """The test method that runs ``check`` against the class's plugin."""

    def test(self: BaseRoleTests, request: pytest.FixtureRequest, check_context: Any) -> None:
        ctx: CheckContext = check_context
        self._bind(ctx, request)
        unmet = unmet_requirement(check, ctx)
        if unmet is not None:
            pytest.skip(unmet)
        try:
            check.fn(ctx)
        except CheckSkipped as exc:
            pytest.skip(str(exc))

    test.__name__ = test.__qualname__ = f"test_{check.name}"
    test.__doc__ = check.fn.__doc__
    return test


class BaseRoleTests:
    """What the role classes share: the ``plugin`` and ``plugin_config`` fixtures, the
    shared check context, and one ``test_<check>`` method per check of ``role``.

    Subclass a role's class (:class:`BaseLabellerTests`, ...), not this one.
    """

    #: The role whose checks the class runs; set by each role's class.
    role: ClassVar[str] = ""
    #: Check name -> why it is expected to fail; such a test is a strict ``xfail``.
    expected_failed_checks: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.role:
            return
        checks = CHECKS.get(cls.role, [])
        names = {c.name for c in checks}
        unknown = sorted(set(cls.expected_failed_checks) - names)
        if unknown:
            raise TypeError(
                f"{cls.__name__}.expected_failed_checks names unknown {cls.role} checks "
                f"{unknown}; the {cls.role} checks are: {', '.join(sorted(names))}"
            )
        for check in checks:
            attr = f"test_{check.name}"
            if attr in cls.__dict__:  # the class wrote its own version of this test
                continue
            test = _make_test(check)
            if check.name in cls.expected_failed_checks:
                reason = cls.expected_failed_checks[check.name]
                test = pytest.mark.xfail(reason=reason, strict=True)(test)
            setattr(cls, attr, test)

    # --- fixtures to override ---------------------------------------------------------

    @pytest.fixture
    def plugin(self) -> Any:
        """The plugin to check. **Override this fixture.**

        Return its registered name (``str``, as ``caikit plugins`` lists it; it is
        built with ``plugin_config`` and the role's keyword arguments, as a run
        builds it), a :class:`caikit_core.plugins.PluginSpec`, or an instance you
        built yourself (then ``plugin_config`` and the model fixtures are not used
        to build it). The tests of the class share what the checks build while this
        returns the same value: to share an instance, give the fixture
        ``scope="class"`` (with ``@classmethod`` under ``@pytest.fixture``).
        """
        role = self.role or "ROLE"
        raise NotImplementedError(
            f"{type(self).__name__} must override the `plugin` fixture: return the {role} to "
            f"check, as its registered name (a str, as `caikit plugins` lists it), a "
            f"caikit_core.plugins.PluginSpec, or a built instance with "
            f"{_INSTANCE_CONTRACT.get(role, 'the role protocol')}. For example:\n\n"
            "    @pytest.fixture\n"
            "    def plugin(self):\n"
            '        return "my-plugin"\n'
        )

    @pytest.fixture
    def plugin_config(self) -> Any:
        """The plugin's settings: ``None`` (the default) for the kit's small settings of a
        bundled plugin, else ``config_cls()``; a ``dict`` of settings layered over those;
        or an instance of the plugin's config class. Not used for a built instance."""
        return None

    # --- machinery ----------------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def _kit_contexts(cls) -> Iterator[dict[Any, tuple[Any, CheckContext]]]:
        """Check contexts shared by the tests of one class, dropped after the class."""
        contexts: dict[Any, tuple[Any, CheckContext]] = {}
        yield contexts
        contexts.clear()

    @pytest.fixture
    def check_context(
        self,
        plugin: Any,
        plugin_config: Any,
        _kit_contexts: dict[Any, tuple[Any, CheckContext]],
        tmp_path_factory: pytest.TempPathFactory,
    ) -> CheckContext:
        """The :class:`~caikit_core.testing.checks.CheckContext` the checks run in, shared
        by the tests of the class while ``plugin`` and ``plugin_config`` stay the same."""
        key = (_identity(plugin), _identity(plugin_config))
        if key not in _kit_contexts:
            workdir = tmp_path_factory.mktemp(f"caikit-check-{self.role}")
            context = make_context(self.role, plugin, config=plugin_config, workdir=workdir)
            # Keep the values alive with the context, so an id() key cannot be reused.
            _kit_contexts[key] = ((plugin, plugin_config), context)
        return _kit_contexts[key][1]

    def _bind(self, ctx: CheckContext, request: pytest.FixtureRequest) -> None:
        """Point the context's factories at this class's fixtures (resolved when needed)."""

    @staticmethod
    def _fixture(request: pytest.FixtureRequest, name: str) -> Callable[[], Any]:
        """A callable that resolves the fixture ``name`` for the running test."""
        return lambda: request.getfixturevalue(name)


class _ModelBacked(BaseRoleTests):
    """A role built on a checkpoint folder (``model=``): the ``tiny_model`` fixture."""

    @pytest.fixture
    def tiny_model(self) -> Path:
        """The checkpoint folder (a :class:`pathlib.Path`) the checks build on: by default
        :func:`caikit_core.testing.fixtures.tiny_model`, a tiny random Llama (2048
        positions, a chat template) built once per process with no hub access."""
        from caikit_core.testing.fixtures import tiny_model

        return tiny_model()

    def _bind(self, ctx: CheckContext, request: pytest.FixtureRequest) -> None:
        model = self._fixture(request, "tiny_model")
        ctx.model_factory = model
        if self.role in ("generator", "preference_model"):
            ctx.role_kwargs_factory = lambda: {"model": str(model())}


class _FeedbackBacked(BaseRoleTests):
    """A role built on a generator and a constitution (critics and labellers)."""

    @pytest.fixture
    def generator(self) -> Any:
        """The generator the plugin is built with (``generator=``): by default the bundled
        ``hf`` generator on the tiny model, on CPU
        (:func:`caikit_core.testing.fixtures.hf_generator`)."""
        from caikit_core.testing.fixtures import hf_generator

        return hf_generator()

    @pytest.fixture
    def constitution(self) -> Any:
        """The :class:`caikit_core.constitution.Constitution` the plugin is built with
        (``constitution=``): by default the one caikit ships (``load_constitution(None)``)."""
        from caikit_core.testing.fixtures import default_constitution

        return default_constitution()

    def _bind(self, ctx: CheckContext, request: pytest.FixtureRequest) -> None:
        generator = self._fixture(request, "generator")
        constitution = self._fixture(request, "constitution")
        ctx.constitution_factory = constitution
        ctx.role_kwargs_factory = lambda: {
            "generator": generator(),
            "constitution": ctx.constitution(),
        }


class BaseGeneratorTests(_ModelBacked):
    """The generator checks. Override ``plugin``; optionally ``plugin_config`` and
    ``tiny_model`` (the folder a named generator is built on, ``model=str(folder)``)."""

    role = "generator"


class BaseCriticTests(_FeedbackBacked):
    """The critic checks. Override ``plugin``; optionally ``plugin_config``,
    ``generator`` and ``constitution`` (what a named critic is built with)."""

    role = "critic"


class BaseLabellerTests(_FeedbackBacked):
    """The labeller checks. Override ``plugin``; optionally ``plugin_config``,
    ``generator`` and ``constitution`` (what a named labeller is built with)."""

    role = "labeller"


class BasePreferenceModelTests(_ModelBacked):
    """The preference model checks. Override ``plugin``; optionally ``plugin_config``
    and ``tiny_model`` (the trunk a named preference model is built on)."""

    role = "preference_model"


class BasePolicyOptimiserTests(_ModelBacked):
    """The policy optimiser checks. Override ``plugin``; optionally ``plugin_config``
    and ``tiny_model`` (the policy checkpoint the SFT, PPO and preference-loss checks
    start from; it needs a chat template)."""

    role = "policy_optimiser"


class BaseExecutorTests(BaseRoleTests):
    """The executor checks. Override ``plugin``; optionally ``plugin_config``."""

    role = "executor"


class BaseInstrumentTests(BaseRoleTests):
    """The instrument checks. Override ``plugin``; optionally ``plugin_config`` and
    ``eval_context`` (the context the instrument is evaluated against, once per class)."""

    role = "instrument"

    @pytest.fixture
    def eval_context(self, tmp_path_factory: pytest.TempPathFactory) -> Any:
        """The :class:`caikit_core.evaluation.EvalContext` to evaluate against: by
        default the kit's (:class:`caikit_core.testing.instrument_checks.KitEvalContext`:
        the ``hf`` generator and ``direct`` labeller on the tiny model, a word-count
        preference model, one checkpoint ``base``)."""
        from caikit_core.testing.instrument_checks import KitEvalContext

        return KitEvalContext(tmp_path_factory.mktemp("caikit-check-eval"))

    def _bind(self, ctx: CheckContext, request: pytest.FixtureRequest) -> None:
        ctx.eval_context_factory = self._fixture(request, "eval_context")
