"""One declaration per endpoint: its API name, the action it needs and its callback.

Every event of the UI (buttons, tab opens, selections, page loads, timers, the chained
steps after an action) is an endpoint: the browser calls it by number, so anyone who is
logged in can call any of them, hidden or not. So each callback is declared with the
name it is registered under::

    endpoint = Endpoints(lab)

    @endpoint("label_pick_box")
    def on_pick(cur, face): ...

    picker.change(on_pick, [current, picker], outputs, api_name=on_pick.api_name,
                  api_visibility="private")

``pipeline.auth.ENDPOINT_ACTIONS`` gives the action for the name (an unknown name fails
at once). The wrapper asks ``auth.require`` before the callback runs, on every call,
reading the user from the database, so a removed, disabled or demoted user is refused
at once. User errors (``FaceLabError``) and a full disk become a message for the user.
``check_declared(demo)`` refuses a UI with any event whose callback was not declared, or
was registered under another name than it was declared with.
"""

from __future__ import annotations

import functools
import html
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import gradio as gr

from pipeline import auth
from pipeline.context import Lab
from pipeline.errors import FaceLabError, storage_error

#: the parameter added to callbacks that do not take the request themselves
REQUEST_PARAMETER = "facelab_request"
_REQUEST_HINTS = (gr.Request, Optional[gr.Request])  # noqa: UP007 - what Gradio compares with


@dataclass(frozen=True)
class Declaration:
    api_name: str
    action: str


def user_error(exc: BaseException) -> gr.Error:
    """A message for the user; it may quote user input (names, file names): shown as text."""
    return gr.Error(html.escape(str(exc)), print_exception=False)


class Endpoints:
    """Declares the endpoints of one UI (see the module docstring)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def __call__(self, api_name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        action = auth.ENDPOINT_ACTIONS.get(api_name)
        if action is None:
            raise KeyError(f"endpoint {api_name!r} is not in pipeline.auth.ENDPOINT_ACTIONS; add it with its action")
        declaration = Declaration(api_name, action)
        return lambda fn: self._guard(declaration, fn)

    def allow(self, api_name: str, request: gr.Request | None) -> str:
        """The role check for ``api_name``: the user name to record, or a gr.Error."""
        try:
            return auth.require_endpoint(self.lab, getattr(request, "username", None), api_name)
        except FaceLabError as exc:
            raise user_error(exc) from exc

    def _guard(self, declaration: Declaration, fn: Callable[..., Any]) -> Callable[..., Any]:
        target = fn.func if isinstance(fn, functools.partial) else fn
        # resolved now, so an annotation Gradio could not resolve (it would then silently
        # skip injecting the request) fails when the UI is built
        hints = typing.get_type_hints(target)
        signature = inspect.signature(fn)
        params = list(signature.parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        request_name = next((p.name for p in positional if hints.get(p.name) in _REQUEST_HINTS), None)
        added = request_name is None
        if added:
            # Gradio fills parameters annotated gr.Request by position: add one after the
            # positional ones (a default keeps the signature valid after defaulted ones)
            extra = inspect.Parameter(REQUEST_PARAMETER, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                      default=None, annotation=gr.Request)
            params.insert(len(positional), extra)
            request_name = REQUEST_PARAMETER
        guarded_signature = signature.replace(parameters=params)
        allow = self.allow
        lab = self.lab

        def guarded(*args: Any, **kwargs: Any) -> Any:
            bound = guarded_signature.bind(*args, **kwargs)
            request = bound.arguments.pop(request_name, None) if added else bound.arguments.get(request_name)
            allow(declaration.api_name, request)
            try:
                return fn(*bound.args, **bound.kwargs)
            except FaceLabError as exc:
                raise user_error(exc) from exc
            except Exception as exc:
                full = storage_error(exc, near=lab.settings.data_dir)
                if full is None:
                    raise
                raise user_error(full) from exc

        guarded.__name__ = getattr(target, "__name__", declaration.api_name)
        guarded.__qualname__ = getattr(target, "__qualname__", declaration.api_name)
        guarded.__doc__ = getattr(target, "__doc__", None)
        guarded.__signature__ = guarded_signature  # type: ignore[attr-defined]
        guarded.__annotations__ = {name: hint for name, hint in hints.items() if name in signature.parameters}
        guarded.__annotations__[request_name] = gr.Request
        guarded.facelab_endpoint = declaration  # type: ignore[attr-defined]
        guarded.api_name = declaration.api_name  # type: ignore[attr-defined]
        return guarded


def declaration_of(fn: object) -> Declaration | None:
    return getattr(fn, "facelab_endpoint", None)


def check_declared(demo: gr.Blocks) -> None:
    """Refuse a UI with an event whose callback is not declared under its API name."""
    wrong = []
    for index, block_fn in demo.fns.items():
        if block_fn.fn is None:  # a browser-only (js) event: nothing runs on the server
            continue
        declaration = declaration_of(block_fn.fn)
        if declaration is None:
            wrong.append(f"#{index} {block_fn.name} (api_name {block_fn.api_name!r}) is not declared")
        elif declaration.api_name != block_fn.api_name:
            wrong.append(f"#{index} {block_fn.name} is declared as {declaration.api_name!r} "
                         f"but registered as {block_fn.api_name!r}")
    if wrong:
        raise RuntimeError("every event needs `@endpoint(api_name)` and `api_name=` (webapp/endpoints.py):\n"
                           + "\n".join(wrong))
