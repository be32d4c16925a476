"""Fixtures of the MAP tests: an isolated registry with lora, map and the test-only dense update."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

DENSE_MODULE = "modapt_map_tests_dense_update"


def load_dense_update():
    """The test-only ``dense`` update plugin module (tests/ is not a package under importlib mode)."""
    if DENSE_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(DENSE_MODULE, Path(__file__).with_name("dense_update.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[DENSE_MODULE] = module
        spec.loader.exec_module(module)
    return sys.modules[DENSE_MODULE]


load_dense_update()


@pytest.fixture
def registry(modapt_registry):
    import modapt.lora
    import modapt_map.plugin

    modapt_registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    modapt_registry.register_plugin(modapt_map.plugin, name="map", distribution="modapt-map")
    modapt_registry.register_plugin(load_dense_update(), name="dense", distribution="modapt-map-tests")
    return modapt_registry
