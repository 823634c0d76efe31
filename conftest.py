"""Loads durable_heap's pytest plugin (its fixtures) also where the package is not installed."""

pytest_plugins = ["durable_heap.pytest_plugin"]
