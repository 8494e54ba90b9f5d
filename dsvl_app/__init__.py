"""dsvl-chat: the Gradio app around the dsvl core (see app.py for the command line).

    from dsvl_app import Settings, build_app, launch_options, start_in_background
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Settings": "dsvl_app.settings",
    "parse_settings": "dsvl_app.settings",
    "build_app": "dsvl_app.ui",
    "launch_options": "dsvl_app.ui",
    "start_in_background": "dsvl_app.ui",
    "main": "dsvl_app.cli",
}


def __getattr__(name: str) -> Any:  # lazy: `python app.py --help` need not import gradio
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dsvl_app' has no attribute {name!r}")


__all__ = list(_EXPORTS)
