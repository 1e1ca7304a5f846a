"""The base test classes of the conformance kit (``caikit_core.testing.base``).

Bundled plugins pass as one-fixture subclasses collected right here; a subclass that
forgets its ``plugin`` fixture, one with a broken plugin and one with expected
failures are written to a temporary file and run by pytest in a subprocess, and
their outcomes read back test by test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from caikit_core.interfaces import FitReport  # noqa: E402
from caikit_core.records import LabelledComparison, Sample  # noqa: E402
from caikit_core.testing.base import (  # noqa: E402
    BaseCriticTests,
    BaseExecutorTests,
    BaseGeneratorTests,
    BaseLabellerTests,
    BasePolicyOptimiserTests,
    BasePreferenceModelTests,
)
from caikit_core.testing.checks import CHECKS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- bundled plugins pass -----------------------------------------------------------------


class TestLocalExecutor(BaseExecutorTests):
    @pytest.fixture
    def plugin(self) -> str:
        return "local"


class TestDirectLabeller(BaseLabellerTests):
    @pytest.fixture
    def plugin(self) -> str:
        return "direct"


class TestDirectLabellerClamped(BaseLabellerTests):
    """A config dict is layered over the kit's settings; the clamp check then applies."""

    @pytest.fixture
    def plugin(self) -> str:
        return "direct"

    @pytest.fixture
    def plugin_config(self) -> dict[str, Any]:
        return {"clamp": [0.2, 0.8]}


class TestConstitutionalCritic(BaseCriticTests):
    @pytest.fixture
    def plugin(self) -> str:
        return "constitutional"


class TestHFGenerator(BaseGeneratorTests):
    @pytest.fixture
    def plugin(self) -> str:
        return "hf"


class ConstantPM:
    """Scores every response 0.0: deterministic and reloadable, but it learns nothing."""

    capabilities: frozenset[str] = frozenset()

    def fit(self, labelled: Sequence[LabelledComparison], out: Path) -> FitReport:
        out.mkdir(parents=True, exist_ok=True)
        (out / "constant.json").write_text("{}", encoding="utf-8")
        return FitReport(str(out), {"examples": float(len(labelled))})

    def load(self, path: Path) -> None:
        assert (path / "constant.json").is_file()

    def score(self, samples: Sequence[Sample]) -> list[float]:
        return [0.0 for _ in samples]


class TestConstantPreferenceModel(BasePreferenceModelTests):
    """An instance from a class-scoped fixture, and a strict expected failure."""

    expected_failed_checks = {
        "check_preference_model_fits_marker_set": "a constant score cannot rank pairs"
    }

    @pytest.fixture(scope="class")
    @classmethod
    def plugin(cls) -> ConstantPM:
        return ConstantPM()


# --- the classes' shape -------------------------------------------------------------------

BASES = [
    BaseGeneratorTests,
    BaseCriticTests,
    BaseLabellerTests,
    BasePreferenceModelTests,
    BasePolicyOptimiserTests,
    BaseExecutorTests,
]


@pytest.mark.parametrize("base", BASES, ids=lambda b: b.__name__)
def test_one_test_per_check(base: type[Any]) -> None:
    tests = sorted(name for name in vars(base) if name.startswith("test_"))
    assert tests == sorted(f"test_{check.name}" for check in CHECKS[base.role])
    check = CHECKS[base.role][0]
    assert getattr(base, f"test_{check.name}").__doc__ == check.fn.__doc__


def test_expected_failures_become_strict_xfail_marks() -> None:
    marked = TestConstantPreferenceModel.test_check_preference_model_fits_marker_set
    (mark,) = marked.pytestmark
    assert mark.name == "xfail"
    assert mark.kwargs == {"reason": "a constant score cannot rank pairs", "strict": True}
    assert not hasattr(
        BasePreferenceModelTests.test_check_preference_model_fits_marker_set, "pytestmark"
    )


def test_unknown_expected_check_is_an_error_at_class_definition() -> None:
    with pytest.raises(TypeError, match=r"TestTypo.expected_failed_checks names unknown labeller"):

        class TestTypo(BaseLabellerTests):
            expected_failed_checks = {"check_labeller_determinstic": "typo"}


# --- a plugin author's test file, run by pytest ----------------------------------------------

AUTHOR_TESTS = '''
import pytest

from caikit_core.records import OptionScore, PreferenceLabel
from caikit_core.testing.base import BaseExecutorTests, BaseLabellerTests


class Overconfident:
    """Returns p_a = 1.3 for every comparison: not a probability."""

    capabilities = frozenset()

    def label(self, comparisons, *, seed):
        evidence = (OptionScore("helpful", "AB", -0.2, -1.9),)
        return [
            PreferenceLabel(f"l-{c.id}", c.id, 1.3, "overconfident", evidence=evidence)
            for c in comparisons
        ]


class TestForgot(BaseExecutorTests):
    pass


class TestOverconfident(BaseLabellerTests):
    @pytest.fixture
    def plugin(self):
        return Overconfident()


class TestOverconfidentKnown(BaseLabellerTests):
    expected_failed_checks = {
        "check_labeller_probabilities_in_unit_interval": "odds, not probabilities (#12)",
        "check_labeller_provenance": "wrongly expected",
    }

    @pytest.fixture
    def plugin(self):
        return Overconfident()
'''


@pytest.fixture(scope="module")
def author_run(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    folder = tmp_path_factory.mktemp("author")
    (folder / "test_mine.py").write_text(textwrap.dedent(AUTHOR_TESTS), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("CAIKIT_LOAD_PLUGINS", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-rA", "-vv", "-p", "no:cacheprovider", "test_mine.py"],
        cwd=folder,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def _outcomes(output: str) -> dict[str, tuple[str, str]]:
    """``Class::test`` -> (outcome, message) from pytest's ``-rA`` summary lines."""
    found = {}
    for line in output.splitlines():
        m = re.match(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+?)(?: - (.*))?$", line)
        if m and "::" in m.group(2):
            name = m.group(2).split("::", 1)[1]
            found[name] = (m.group(1), m.group(3) or "")
    return found


def test_author_file_outcomes(author_run: subprocess.CompletedProcess[str]) -> None:
    out = author_run.stdout
    assert author_run.returncode == 1, out + author_run.stderr
    summary = out.strip().splitlines()[-1]
    assert re.search(r"2 failed, 3 passed, 6 skipped, 1 xfailed, 5 errors", summary), summary
    outcomes = _outcomes(out)

    failed = {name for name, (what, _) in outcomes.items() if what == "FAILED"}
    assert failed == {
        "TestOverconfident::test_check_labeller_probabilities_in_unit_interval",
        "TestOverconfidentKnown::test_check_labeller_provenance",
    }
    _, message = outcomes["TestOverconfident::test_check_labeller_probabilities_in_unit_interval"]
    assert "p_a=1.3" in message and "must be a finite float in [0, 1]" in message
    assert (
        "[XPASS(strict)] wrongly expected"
        in outcomes["TestOverconfidentKnown::test_check_labeller_provenance"][1]
    )
    assert outcomes[
        "TestOverconfidentKnown::test_check_labeller_probabilities_in_unit_interval"
    ] == (
        "XFAIL",
        "odds, not probabilities (#12)",
    )
    assert outcomes["TestOverconfident::test_check_labeller_deterministic"][0] == "PASSED"
    assert outcomes["TestOverconfident::test_check_labeller_provenance"][0] == "PASSED"


def test_author_file_forgotten_plugin_fixture(
    author_run: subprocess.CompletedProcess[str],
) -> None:
    outcomes = _outcomes(author_run.stdout)
    errors = {name for name, (what, _) in outcomes.items() if what == "ERROR"}
    assert errors == {f"TestForgot::test_{c.name}" for c in CHECKS["executor"]}
    _, message = outcomes["TestForgot::test_check_executor_matches_local"]
    assert message.startswith("NotImplementedError: TestForgot must override the `plugin` fixture")
    contract = (
        "return the executor to check, as its registered name (a str, as `caikit plugins` "
        "lists it), a caikit_core.plugins.PluginSpec, or a built instance with "
        "map(worker_spec, keyed_batches, *, total, describe) -> Iterator[(key, list)]"
    )
    assert contract in author_run.stdout
    assert 'def plugin(self):\n        return "my-plugin"' in author_run.stdout


def test_author_file_skips_name_the_missing_capability(
    author_run: subprocess.CompletedProcess[str],
) -> None:
    # swap and identical-responses (debias) in both labeller classes; clamp in both
    assert re.search(
        r"^SKIPPED \[4\] \S+base\.py:\d+: needs capability debias$", author_run.stdout, re.M
    )
    assert re.search(
        r"^SKIPPED \[2\] \S+base\.py:\d+: needs capability clamp$", author_run.stdout, re.M
    )
