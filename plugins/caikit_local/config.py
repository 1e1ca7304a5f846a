"""Settings of the ``local`` executor."""

from __future__ import annotations

import attrs


@attrs.frozen
class LocalExecutorConfig:
    """Settings of the local executor.

    :param progress: show a progress bar on stderr (also off under ``caikit --quiet``).
    """

    progress: bool = True
