"""One local Ray for the test session (its start counts once), and the bundled
``ray`` plugin registered in-process where the installed metadata lacks its entry point."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.shared import ensure_bundled

#: what the session's Ray may use: the CI machine's 2 cores and a small object store
RAY_CPUS = 2
OBJECT_STORE_BYTES = 200 * 1024 * 1024


@pytest.fixture(scope="package")
def ray_session() -> Iterator[None]:
    """A local Ray with 2 CPUs and a 200 MB object store; every ``ray`` executor built
    in this process uses it. Started once per test session (only this package's tests
    use Ray) and shut down when this package's tests end, so the plugin tests that run
    after them do not share the machine with an idle Ray."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(
            num_cpus=RAY_CPUS,
            object_store_memory=OBJECT_STORE_BYTES,
            include_dashboard=False,
            logging_level="WARNING",
        )
    # Ray Data binds its log handler to sys.stderr when first imported: import it here,
    # not inside a test whose stderr is a capture buffer closed when the test ends
    import ray.data

    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def ray_plugin(request: pytest.FixtureRequest) -> None:
    """The ``ray`` executor in this test's (fresh) plugin manager (after ``with_echo``,
    which makes a new one, where the test uses it)."""
    if "with_echo" in request.fixturenames:
        request.getfixturevalue("with_echo")
    ensure_bundled("ray")
