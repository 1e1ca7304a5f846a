"""The hook specifications of caikit: one registration hook per role.

Each hook receives a ``register`` callable. A plugin calls it once per thing it
provides::

    from caikit_core import hookimpl

    @hookimpl
    def register_labellers(register):
        register("direct", DirectLabeller, config=DirectLabellerConfig,
                 capabilities={"debias"})

The factory is called later, only when a run names the plugin, with the
validated config instance as its first argument and role-specific keyword
arguments (see ``docs/plugin-hooks.md``). Heavy frameworks (torch, jax, vllm,
ray) must be imported inside the factory, never at module level.

:func:`register_evaluations` registers evaluation instruments the same way (their
factory is called as ``factory(config)``); instruments are not roles of a run, so a
run file has no table naming one plugin for them. One more hook,
:func:`register_commands`, adds sub-commands to the ``caikit``
command line in the same style: its ``register`` adds one command per call.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import pluggy

PROJECT_NAME = "caikit"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class Register(Protocol):
    """The ``register`` callable handed to every registration hook."""

    def __call__(
        self,
        name: str,
        factory: Callable[..., Any],
        *,
        config: type | None = None,
        capabilities: Iterable[str] = (),
        description: str = "",
        check_settings: Mapping[str, Any] | None = None,
        preflight: Callable[[], str | None] | None = None,
    ) -> None:
        """Register one implementation of the hook's role.

        :param name: the name a run file uses in ``plugin = "NAME"``; unique per role.
        :param factory: called as ``factory(config, **role_kwargs)`` to build the instance.
        :param config: an attrs class holding the plugin's settings; ``None`` means
            the plugin takes no settings.
        :param capabilities: flags from :mod:`caikit_core.interfaces` (e.g. ``"score"``).
        :param description: one line shown by ``caikit plugins``.
        :param check_settings: small, valid settings (as a run file's table would
            give them) that the conformance kit builds the plugin with, so its
            checks run in seconds on a CPU; ``None``: the config's defaults.
        :param preflight: called (without heavy imports) when a run file names the
            plugin, before any stage runs; returns why the plugin cannot run in this
            environment (e.g. a missing package, naming the command that installs
            it), or ``None``.
        """


# --- generation ---------------------------------------------------------------------


@hookspec
def register_generators(register: Register) -> None:
    """Register generators: chat messages in, sampled completions (and scores) out.

    :param register: call ``register(name, factory, config=..., capabilities=...)``.
        The factory is called as ``factory(config, *, model: str)``, where ``model``
        is a local checkpoint directory or a hub id, and returns a
        :class:`caikit_core.interfaces.Generator`.
    """


# --- feedback -----------------------------------------------------------------------


@hookspec
def register_critics(register: Register) -> None:
    """Register critics: (prompt, response) and a constitution in, a revision trace out.

    :param register: call ``register(name, factory, config=..., capabilities=...)``.
        The factory is called as ``factory(config, *, generator: Generator,
        constitution: Constitution)`` and returns a
        :class:`caikit_core.interfaces.Critic`.
    """


@hookspec
def register_labellers(register: Register) -> None:
    """Register labellers: a comparison of two responses in, P(A preferred) out.

    :param register: call ``register(name, factory, config=..., capabilities=...)``.
        The factory is called as ``factory(config, *, generator: Generator,
        constitution: Constitution)``, where ``generator`` wraps the feedback
        model, and returns a :class:`caikit_core.interfaces.Labeller`.
    """


# --- training -----------------------------------------------------------------------


@hookspec
def register_preference_models(register: Register) -> None:
    """Register preference models: fit on soft labels, score (prompt, response) pairs.

    :param register: call ``register(name, factory, config=..., capabilities=...)``.
        The factory is called as ``factory(config, *, model: str)``, where ``model``
        is the trunk checkpoint to start from, and returns a
        :class:`caikit_core.interfaces.PreferenceModel`.
    """


@hookspec
def register_policy_optimisers(register: Register) -> None:
    """Register policy optimisers: SFT on revisions, and RL or preference losses.

    :param register: call ``register(name, factory, config=..., capabilities=...)``.
        The factory is called as ``factory(config)`` and returns a
        :class:`caikit_core.interfaces.PolicyOptimiser`.
    """


# --- execution ----------------------------------------------------------------------


@hookspec
def register_executors(register: Register) -> None:
    """Register executors: how a stage maps over batches of records.

    :param register: call ``register(name, factory, config=..., capabilities=...)``.
        The factory is called as ``factory(config)`` and returns a
        :class:`caikit_core.interfaces.Executor`.
    """


# --- evaluation ---------------------------------------------------------------------


@hookspec
def register_evaluations(register: Register) -> None:
    """Register evaluation instruments: measurements of the run's models, generators,
    labellers or preference models (``caikit eval NAME``, a run's ``[eval]`` table).

    :param register: call ``register(name, factory, config=...)``. The factory is
        called as ``factory(config)`` and returns a
        :class:`caikit_core.evaluation.Instrument`: ``requires`` names what it asks
        the run for, checked before anything runs, and ``evaluate(ctx)`` returns an
        :class:`caikit_core.evaluation.EvalResult`. The factory must not load models;
        ``evaluate`` builds them through ``ctx``.
    """


# --- command line -------------------------------------------------------------------

#: What runs a command: the parsed arguments in, the exit status out.
CommandHandler = Callable[[argparse.Namespace], int]


class RegisterCommand(Protocol):
    """The ``register`` callable handed to :func:`register_commands`."""

    def __call__(
        self,
        name: str,
        handler: CommandHandler | None = None,
        *,
        help: str,
        description: str | None = None,
        parent: argparse.ArgumentParser | None = None,
    ) -> argparse.ArgumentParser:
        """Add the command ``caikit NAME`` and return its parser, to add arguments to.

        :param name: the command's name; unique among the commands of its parent.
        :param handler: called with the parsed arguments when the command runs; it
            returns the exit status. A :class:`caikit_core.errors.CaikitError` it
            raises is printed as one ``error:`` line with exit status 2. ``None``
            makes a group whose sub-commands are added with ``parent=``.
        :param help: one line for ``caikit --help``.
        :param description: the text of ``caikit NAME --help`` (default: ``help``).
        :param parent: a parser this callable returned: add ``caikit PARENT NAME``.
        """


@hookspec
def register_commands(register: RegisterCommand) -> None:
    """Register sub-commands of the ``caikit`` command line.

    :param register: call ``register(name, handler, help=...)`` once per command
        and add arguments to the :class:`argparse.ArgumentParser` it returns; the
        output options (``-q``, ``-v``, ``--debug``) are already there. Import
        heavy frameworks inside the handler, never in the hook.
    """
