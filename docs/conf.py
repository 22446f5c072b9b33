"""Sphinx configuration: Markdown pages (MyST), the API reference from the docstrings (autodoc,
napoleon for Google style), the furo theme. Built with ``sphinx-build -W -n`` (``make docs``):
every warning fails, every unresolved reference too, except the external ones listed in
``nitpick_ignore_regex`` (the build machine cannot fetch intersphinx inventories)."""

from __future__ import annotations

from pathlib import Path

import reflora

DOCS = Path(__file__).resolve().parent

project = "reflora"
author = "reflora developers"
copyright = "2026, reflora developers"
release = version = reflora.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_default_options = {"show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # an "Attributes:" section must not re-declare a documented property

# No intersphinx: the build reaches package registries only. References to other projects'
# objects (torch, Python's standard library and builtins, the optional integrations) are left
# unresolved on purpose; everything inside reflora must resolve.
_EXTERNAL = (
    r"(torch|typing|typing_extensions|collections|contextlib|dataclasses|enum|importlib|numpy|peft|"
    r"transformers|timm|torch_geometric|deepspeed|bitsandbytes|torchao|trl|accelerate|argparse|pathlib|abc|"
    r"pytorch_lightning|lightning)(\..*)?"
)
_BUILTINS = (
    r"(int|float|bool|str|bytes|dict|list|tuple|set|frozenset|object|type|None|callable|Callable|Any|"
    r"Iterable|Iterator|Sequence|Mapping|Literal|Optional|Union|TypeVar|Tensor|Module|Parameter|nn\..*|"
    r"Optimizer|DTensor|DeviceMesh|Path|Exception|ValueError|TypeError|RuntimeError|KeyError|"
    r"NotImplementedError|UserWarning|Warning|NamedTuple|T|optional|sequence|iterable|mapping)"
)
# Annotations autodoc cannot link: a re-exported class named by its short name in a signature,
# parts of subscripted generics it splits, and private helper classes.
_UNLINKABLE = r"(LoRAPair|Chunks|Metrics|tuple\[.*|reflora(\.\w+)*\._\w+)"
nitpick_ignore_regex = [
    (r"py:.*", _EXTERNAL),
    (r"py:.*", _BUILTINS),
    (r"py:.*", _UNLINKABLE),
]

# An object re-exported under a second name (reflora.LoRAPair = reflora.pairs.LoRAPair) makes a
# short reference ambiguous between the two names of one object: not an error.
suppress_warnings = ["ref.python"]

html_theme = "furo"
html_title = f"reflora {release}"
html_static_path: list[str] = []
