"""The format and front-end tables are the single source: every entry is tested, exported, documented and offered.

A new runtime or front end is one module plus one table entry; these tests fail until it also has its own test,
an exporter, a CLI choice and a line in the docs.
"""

from __future__ import annotations

import os
import re

import pytest
import yaml

from archiver.cli import build_parser
from archiver.optimize.formats import FORMATS
from archiver.spec import DeploySpec, resolve_paths
from handlers.registry import FRONTENDS, RUNTIMES, load_class
from handlers.spec import parse
from tests.support import REPO

TESTS = os.path.join(REPO, "tests")


def _test_sources() -> str:
    texts = []
    for root, _, files in os.walk(TESTS):
        for name in files:
            if name.endswith(".py") and name != os.path.basename(__file__):
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    texts.append(f.read())
    return "\n".join(texts)


TEST_TEXT = _test_sources()


@pytest.mark.parametrize("name", sorted(RUNTIMES))
def test_every_format_is_built_by_a_test_of_its_own(name):
    pattern = rf"""["']format["']\s*:\s*["']{name}["']|format\s*=\s*["']{name}["']"""
    assert re.search(pattern, TEST_TEXT), f"no test builds format '{name}'"


@pytest.mark.parametrize("name", sorted(FRONTENDS))
def test_every_front_end_is_served_by_a_test_of_its_own(name):
    entry = FRONTENDS[name]
    handler_module = f"handlers.{entry.handler}"
    assert re.search(rf"from {re.escape(handler_module)} import|{re.escape(handler_module)}\b", TEST_TEXT) or \
        re.search(rf"""["']frontend["']\s*:\s*["']{name}["']""", TEST_TEXT), f"no test serves front end '{name}'"


def test_the_exporter_table_and_the_runtime_table_have_the_same_formats():
    assert set(FORMATS) == set(RUNTIMES)
    for name, entry in RUNTIMES.items():
        assert FORMATS[name].runtime is entry
        assert callable(load_class(entry.cls)), name


def test_every_front_end_has_a_handler_module_with_exactly_one_class():
    """TorchServe loads the one class of a handler module; a second class there would be ambiguous."""
    import importlib
    import inspect

    for name, entry in FRONTENDS.items():
        module = importlib.import_module(f"handlers.{entry.handler}")
        own = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
        assert len(own) == 1, (name, own)
        assert load_class(entry.cls) is not None


def test_the_cli_offers_exactly_the_registered_formats_and_front_ends():
    parser = build_parser()
    build = next(a for a in parser._subparsers._group_actions[0].choices["build"]._actions if a.dest == "format")
    frontend = next(a for a in parser._subparsers._group_actions[0].choices["build"]._actions
                    if a.dest == "frontend")
    assert list(build.choices) == list(RUNTIMES)
    assert list(frontend.choices) == list(FRONTENDS)


def test_the_docs_name_every_format_and_front_end():
    with open(os.path.join(REPO, "config", "README.md"), encoding="utf-8") as f:
        schema = f.read()
    for name in RUNTIMES:
        assert re.search(rf"\b{name}\b", schema), f"config/README.md does not mention format '{name}'"
    for name in FRONTENDS:
        assert re.search(rf"\b{name}\b", schema), f"config/README.md does not mention front end '{name}'"


def yaml_blocks(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return re.findall(r"```yaml\n(.*?)```", f.read(), flags=re.S)


def test_the_deploy_spec_and_the_schema_examples_parse():
    """config/deploy.yaml whole, and every YAML block of config/README.md, through the spec parser."""
    spec = DeploySpec.from_yaml(os.path.join(REPO, "config", "deploy.yaml"))
    assert spec.models and spec.ab
    blocks = yaml_blocks(os.path.join(REPO, "config", "README.md"))
    assert blocks
    for block in blocks:
        data = yaml.safe_load(block)
        if "models" not in data and "ab" not in data:  # a fragment: an artifacts list, a text or ab section
            data = {"models": [{"name": "example", "version": "1.0", "source": {"torchscript": "m.pt"},
                                "input": {"shape": [1, 8, 8]}, "image": {"height": 8, "width": 8, "mode": "L"},
                                **data}]}
        resolve_paths(parse(DeploySpec, data), os.path.join(REPO, "config"))
