"""The pytest plugin of modapt (entry point ``pytest11``): fixtures for plugin tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def modapt_registry():
    """A registry with entry-point autoloading off, made the default for the test.

    Register the plugins the test needs with ``modapt_registry.register_plugin(module, name)``.
    """
    from modapt.registry import Registry, use_registry

    registry = Registry(autoload=False)
    with use_registry(registry):
        yield registry


def pytest_generate_tests(metafunc):
    """Run each conformance test once per tiny model family named in the class's ``recipes``."""
    if "conformance_family" in metafunc.fixturenames:
        recipes = getattr(metafunc.cls, "recipes", None) or {}
        metafunc.parametrize("conformance_family", sorted(recipes))
