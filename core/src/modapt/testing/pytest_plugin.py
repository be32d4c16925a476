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
