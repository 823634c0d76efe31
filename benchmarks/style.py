"""One distinct colour, line and marker per system in every benchmark plot.

matplotlib's default cycle has ten colours: the eleventh line of a plot takes the
first line's colour again, so diskcache looked like durable_heap's Dict and the
fsync floor like its List. Each system here has its own colour, whatever plot it
is drawn in and in whatever order; a system added later without one gets a spare
colour no named system uses.
"""

from __future__ import annotations

from typing import Any

#: durable_heap's systems in blues and purples with solid lines, the others dashed,
#: the fsync floor a dotted black line.
COLOURS = {
    "durable_heap": "#1f77b4",            # blue
    "durable_heap_list": "#9467bd",       # purple
    "durable_heap_watched": "#17becf",    # cyan
    "durable_heap_objects": "#393b79",    # indigo
    "durable_heap_zeo": "#6baed6",        # light blue
    "durable_heap_zeo_nosync": "#c5b0d5",  # lavender
    "raw_zodb": "#ff7f0e",                # orange
    "raw_oobtree": "#8c564b",             # brown
    "raw_zodb_zeo": "#ffbb78",            # light orange
    "raw_zodb_zeo_sync": "#c49c94",       # tan
    "sqlite_full": "#2ca02c",             # green
    "sqlite_normal": "#98df8a",           # light green
    "pickle": "#e377c2",                  # pink
    "shelve": "#7f7f7f",                  # grey
    "diskcache": "#bcbd22",               # olive
    "fsync": "#000000",                   # black
    "dict": "#d62728",                    # red
    # the threads section's (benchmarks.threads)
    "durable_heap_spread": "#08306b",     # navy
    "raw_zodb_gc": "#d94801",             # dark orange
}

#: For systems without a colour above, in order of first use.
SPARE = ["#843c39", "#637939", "#e7969c", "#7b4173", "#bd9e39", "#5254a3", "#ad494a", "#8ca252"]

_MARKERS = "osD^vP*Xhp<>d8H+x12"  # one per named system
_spare_given: dict[str, str] = {}


def colour(system: str) -> str:
    """The colour of `system`: its own, or a spare one kept for it."""
    if system in COLOURS:
        return COLOURS[system]
    if system not in _spare_given:
        _spare_given[system] = SPARE[len(_spare_given) % len(SPARE)]
    return _spare_given[system]


def style(system: str) -> dict[str, Any]:
    """Keyword arguments for ``Axes.plot`` drawing `system`'s line."""
    names = list(COLOURS)
    marker = _MARKERS[names.index(system)] if system in COLOURS else "o"
    if system == "fsync":
        return {"color": colour(system), "linestyle": ":", "marker": "."}
    own = system.startswith("durable_heap")
    return {"color": colour(system), "linestyle": "-" if own else "--", "marker": marker}
