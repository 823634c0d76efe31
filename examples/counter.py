"""The smallest durable program: a counter that survives restarts.

    durable-heap call examples/counter.py count      -> 1
    durable-heap call examples/counter.py count      -> 2
"""

from durable_heap import state

state.setdefault("count", 0)  # the top level runs at every load: initialise once


def count():
    """Add one to the counter; persisted when this function returns."""
    state.count += 1
    return state.count
