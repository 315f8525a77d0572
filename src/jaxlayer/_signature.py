"""Exact-name argument validation for `call_fn` and `init_fn`."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

CALL_FN_ARGUMENTS = ("params", "state", "rng", "inputs", "training")
INIT_FN_ARGUMENTS = ("rng", "inputs", "training")


def argument_names(
    fn: Callable,
    fn_name: str,
    allowed: Iterable[str],
    required: Iterable[str] = ("inputs",),
    owner: str = "JaxLayer",
) -> list[str]:
    """Returns the argument names of `fn`, in order, after validating them.

    The names are the contract: each must be one of `allowed`, every name of
    `required` must be present, and the function is later called with its
    arguments passed positionally in this order (so that functions with a
    `*args` body and a published `__signature__`, such as Haiku's transformed
    functions, work).

    Args:
        fn: the function to inspect.
        fn_name: `"call_fn"` or `"init_fn"`, for messages.
        allowed: the names the function may take.
        required: the names the function must take.
        owner: the layer, for messages.

    Returns:
        The argument names, in the order of the signature.

    Raises:
        TypeError: `fn` is not callable.
        ValueError: an argument is missing or not supported (`*args` and
            `**kwargs` included).
    """
    allowed = tuple(allowed)
    if not callable(fn):
        raise TypeError(
            f"{owner}: `{fn_name}` must be a callable, got {type(fn).__name__}: {fn!r}."
        )
    try:
        # `inspect.signature` honours a published `__signature__` (Haiku's
        # transformed functions are `*args` underneath).
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{owner}: cannot read the signature of `{fn_name}` ({fn!r}): {err}."
        ) from err
    for name in required:
        if name not in parameters:
            raise ValueError(
                f"Missing required argument in `{fn_name}`: `{name}` ({owner}). "
                f"`{fn_name}` takes arguments with these exact names: "
                f"`{'`, `'.join(allowed)}`; got `{_describe(parameters)}`."
            )
    names = []
    for parameter in parameters.values():
        # The names decide what is passed: `*args`/`**kwargs` name nothing.
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise ValueError(
                f"Unsupported argument in `{fn_name}`: `{parameter}` "
                f"({owner}); arguments are passed by exact name, so "
                f"`{fn_name}` must list them: `{'`, `'.join(allowed)}`."
            )
        if parameter.name not in allowed:
            raise ValueError(
                f"Unsupported argument in `{fn_name}`: `{parameter.name}`, "
                f"supported arguments are `{'`, `'.join(allowed)}` ({owner})."
            )
        names.append(parameter.name)
    return names


def _describe(parameters) -> str:
    return ", ".join(parameters) if parameters else "no arguments"
