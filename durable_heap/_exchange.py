"""``durable-heap export`` and ``import``: a heap's state, or a part of it, as JSON and back;
and ``durable-heap call --each``: one call per line of a file.

The JSON is the tagged form of `durable_heap._jsonform` (the one encoder, the same as
``durable-heap serve``'s): plain JSON where the data is plain, ``{"$date": ...}``,
``{"$object": {"class": ..., "attrs": ...}}`` and the like where JSON lacks the kind.
``state`` itself is written as a JSON object of its attributes.

**An import is all or nothing, in bounded memory.** A small file (at most ``--batch``
entries at its top level, default `BATCH`) is read and applied in one transaction. A
bigger one is read entry by entry (the file is never held whole, see `_TopLevel`) and
its entries are written, ``--batch`` per transaction, into a fresh container of their
own under the root key `IMPORTS_KEY`, which nothing in ``state`` refers to. Only when
the whole file has been read does one last transaction put them in place
(``--replace``: the staged container takes the place of the old value, one reference;
a merge: one reference per entry, the entries' own records stay as they were written).

Why not one transaction for all of it: measured at 100,000 entries (``--batch
1000000``), it peaked at 269 MB against 80 MB in batches of 5,000, growing with the
file (a ZODB transaction keeps every new object in memory until it commits; savepoints
every 10,000 entries did not help: 144 MB against 167 MB, the watch keeps the objects),
and a conflict at its end would redo it all.

Stopped (Ctrl-C, a malformed entry, an unknown class) before that last transaction,
the staged entries are dropped and ``state`` is as it was (Ctrl-C is taken between two
entries or batches, never inside a commit: see `_Interrupts`); a process killed
outright leaves them staged, with nothing referring to them, and the next import drops
them after a day (`STALE`; a pack then removes their records).
"""

from __future__ import annotations

import ast
import contextlib
import datetime
import json
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from ._errors import DurableHeapError, JSONFormError
from ._format import IMPORTS_KEY

__all__ = [
    "BATCH",
    "IMPORTS_KEY",
    "ImportReport",
    "add_commands",
    "call_each",
    "export_data",
    "file_size",
    "import_data",
    "parse_path",
]

#: Entries written per transaction while a big import is staged (``--batch``).
BATCH = 5000
#: Staged imports older than this are taken for leftovers of a killed import.
STALE = datetime.timedelta(hours=24)


def _usage(text: str) -> DurableHeapError:
    from ._ops import UsageError

    return UsageError(text)


# --- paths --------------------------------------------------------------------------------------

Step = tuple[str, Any]  # ("name", "users") from ``.users``, ("item", key) from ``[key]``


def parse_path(text: str) -> list[Step]:
    """``state.users['ann'].tags[0]`` as steps. A step is ``.name`` (an attribute, or a
    dict's string key, or a list's index when digits) or ``[literal]`` (a Python or
    JSON literal: ``['a.b']``, ``[3]``, ``[(1, 2)]``): the form durable_heap's messages
    print paths in."""
    if text != "state" and not text.startswith(("state.", "state[")):
        raise _usage(f"--path {text!r} must start at state (state, state.users, state.users['ann'])")
    steps: list[Step] = []
    i = len("state")
    while i < len(text):
        if text[i] == ".":
            j = i + 1
            while j < len(text) and text[j] not in ".[":
                j += 1
            name = text[i + 1:j]
            if not name:
                raise _usage(f"--path {text!r}: an empty name after '.' at character {i + 1}")
            steps.append(("name", name))
            i = j
        elif text[i] == "[":
            j = _closing(text, i)
            inner = text[i + 1:j]
            try:
                key = ast.literal_eval(inner)
            except (ValueError, SyntaxError):
                try:
                    key = json.loads(inner)
                except ValueError:
                    raise _usage(f"--path {text!r}: [{inner}] is not a literal key or index "
                                 "(quote a string: ['ann'])") from None
            steps.append(("item", key))
            i = j + 1
        else:
            raise _usage(f"--path {text!r}: expected '.' or '[' at character {i + 1}")
    return steps


def _closing(text: str, start: int) -> int:
    """The index of the ``]`` that closes the ``[`` at `start` (quotes and nesting skipped)."""
    depth, quote, i = 0, "", start
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "[(":
            depth += 1
        elif c in "])":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise _usage(f"--path {text!r}: the '[' at character {start + 1} is not closed")


def _show(steps: list[Step]) -> str:
    out = "state"
    for kind, key in steps:
        out += f".{key}" if kind == "name" else f"[{key!r}]"
    return out


def _kind(value: Any) -> str:
    """What a value is, for messages: ``a Dict (3 entries)``, ``an int (4)``, ``a tracker.Task``."""
    from ._containers import Dict, List, Set
    from ._state import Object

    if isinstance(value, Object):
        return f"a {type(value).__module__}.{type(value).__qualname__}"
    if isinstance(value, (Dict, List, Set, dict, list, set)):
        n = len(value)
        unit = ("entr" if isinstance(value, (Dict, dict))
                else "item" if isinstance(value, (List, list)) else "member")
        plural = ("y" if n == 1 else "ies") if unit == "entr" else ("" if n == 1 else "s")
        return f"a {type(value).__name__} ({n:,} {unit}{plural})"
    name = type(value).__name__
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name} ({text})"


def _child(parent: Any, step: Step, where: str) -> tuple[bool, Any]:
    """(found, value) of one step from `parent`; an error if `parent` cannot have children."""
    from ._containers import Dict, List, Set
    from ._state import Object

    kind, key = step
    if isinstance(parent, Object):
        if kind == "item" and not isinstance(key, str):
            raise _usage(f"{where} is {_kind(parent)}: its attributes are names, not {key!r}")
        attrs = parent._dh_as_dict()
        return (key in attrs), attrs.get(key)
    if isinstance(parent, (Dict, dict)):
        if key in parent:
            return True, parent[key]
        return False, None
    if isinstance(parent, (List, list, tuple)):
        index = int(key) if kind == "name" and str(key).isdigit() else key
        if not isinstance(index, int) or isinstance(index, bool):
            raise _usage(f"{where} is a list: give an index ({where}[0]), not {key!r}")
        if -len(parent) <= index < len(parent):
            return True, parent[index]
        return False, None
    if isinstance(parent, (Set, set, frozenset)):
        raise _usage(f"{where} is a set: its members have no path")
    raise _usage(f"{where} is {_kind(parent)}, not a container: --path cannot go into it")


def _resolve(state: Any, steps: list[Step], *, allow_missing_last: bool = False) -> tuple[Any, Any]:
    """(parent, value) at `steps` from `state` (value None: missing, if allowed)."""
    value: Any = state
    parent: Any = None
    for n, step in enumerate(steps):
        where = _show(steps[:n])
        found, child = _child(value, step, where)
        if not found:
            last = n == len(steps) - 1
            if last and allow_missing_last:
                return value, None
            hint = (" (--replace creates it)" if last else "")
            raise _usage(f"--path {_show(steps)}: {where} has no {_show(steps[n:n + 1])[5:].lstrip('.')!s}"
                         f"{hint}")
        parent, value = value, child
    return parent, value


# --- export -------------------------------------------------------------------------------------


def export_data(heap: Any, path: str = "state", out: IO[str] | None = None) -> int:
    """Write the value at `path` as tagged JSON (one line) to `out` (default stdout).

    Read in one read-only transaction: a consistent snapshot, beside writers. Returns
    the number of entries at its top level. ``state`` is written as a JSON object of
    its attributes (so that ``import`` merges them back); anything else as `encode`
    writes it.
    """
    from ._containers import Dict, List, Set
    from ._heap import read_transaction
    from ._jsonform import dump
    from ._state import State

    steps = parse_path(path)
    stream = out if out is not None else sys.stdout
    with read_transaction(heap):
        _, value = _resolve(heap.state, steps)
        if isinstance(value, State):
            value = value._dh_as_dict()
        try:
            dump(value, stream)
        except JSONFormError as exc:
            raise JSONFormError(f"{path} cannot be exported: {str(exc).replace('value', path, 1)}") from None
        stream.write("\n")
        return len(value) if isinstance(value, (dict, list, set, tuple, frozenset, Dict, List, Set)) else 1


# --- reading the file entry by entry ------------------------------------------------------------


class _Counting:
    """A binary file that moves a progress bar by the bytes read through it."""

    def __init__(self, raw: IO[bytes], bar: Any) -> None:
        self._raw, self._bar = raw, bar

    def read(self, n: int = -1) -> bytes:
        chunk = self._raw.read(n)
        self._bar.update(len(chunk))
        return chunk


@dataclass
class _Source:
    """What the file holds at its top level: ``pairs`` (a JSON object: (key, data) pairs),
    ``items`` (a JSON array) or one ``value`` (anything else, a tagged value included)."""

    shape: str
    entries: Iterator[Any]


def _open_source(raw: IO[bytes], name: str, bar: Any) -> _Source:
    """The top level of the JSON in `raw`, its entries read one at a time (`_TopLevel`)."""
    top = _TopLevel(_Counting(raw, bar), name)
    first = top.peek()
    if first == "[":
        return _Source("items", top.items())
    if first != "{":
        return _shape_of(top.whole())
    pairs = top.pairs()
    try:
        key, data = next(pairs)
    except StopIteration:
        return _Source("pairs", iter(()))
    if key.startswith("$"):  # a tagged value at the top: one value
        rest = dict(pairs)
        return _Source("value", iter([{key: data, **rest}]))

    def chained() -> Iterator[Any]:
        yield key, data
        for k, v in pairs:
            if k.startswith("$"):  # as `decode` reads a whole object: a tag is alone or an error
                raise JSONFormError(f"{name}: the top-level key {k!r} starts with '$': write a dict "
                                    "with such keys as {\"$dict\": [[key, value], ...]}")
            yield k, v

    return _Source("pairs", chained())


class _TopLevel:
    """Reads a JSON document's top-level object or array one entry at a time, so that a
    big file is never held whole; each entry is parsed by the standard library's `json`
    (its C scanner, ``raw_decode``). Only the top level's punctuation is read here.

    Why not ijson: its fast (C) backend fails on integers past 64 bits ("integer
    overflow", found by the round-trip property test), and its pure Python backend is
    many times slower than `json`.
    """

    CHUNK = 1 << 16

    def __init__(self, raw: Any, name: str) -> None:
        import codecs

        self._raw, self._name = raw, name
        self._text = codecs.getincrementaldecoder("utf-8-sig")()
        self._buf = ""
        self._pos = 0
        self._eof = False
        self._read_so_far = 0  # characters dropped from the buffer's front
        self._decoder = json.JSONDecoder()

    def _more(self) -> bool:
        if self._eof:
            return False
        chunk = self._raw.read(self.CHUNK)
        try:
            self._buf += self._text.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            raise JSONFormError(f"{self._name} is not UTF-8 text: {exc}") from None
        if not chunk:
            self._eof = True
        return True

    def _error(self, what: str) -> JSONFormError:
        return JSONFormError(f"{self._name} is not JSON: {what} at character "
                             f"{self._read_so_far + self._pos + 1:,}")

    def _skip(self) -> str:
        """The next character that is not white space ("" at the end), not consumed."""
        while True:
            buf, pos = self._buf, self._pos
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            self._pos = pos
            if pos < len(buf):
                return buf[pos]
            if not self._more():
                return ""

    def _compact(self) -> None:
        if self._pos > self.CHUNK:
            self._read_so_far += self._pos
            self._buf, self._pos = self._buf[self._pos:], 0

    def peek(self) -> str:
        return self._skip()

    def _value(self) -> Any:
        """One JSON value from here: read further while it may go on past the buffer (a
        number at its end may have more digits)."""
        self._skip()
        while True:
            try:
                value, end = self._decoder.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as exc:
                if self._more():
                    continue
                raise self._error(exc.msg) from None
            if end >= len(self._buf) and self._more():
                continue
            self._pos = end
            self._compact()
            return value

    def _expect(self, chars: str) -> str:
        c = self._skip()
        if not c or c not in chars:
            found = repr(c) if c else "the end of the file"
            raise self._error(f"expected {' or '.join(repr(x) for x in chars)}, found {found}")
        self._pos += 1
        return c

    def whole(self) -> Any:
        value = self._value()
        if self._skip():
            raise self._error("more data after the JSON value")
        return value

    def pairs(self) -> Iterator[tuple[str, Any]]:
        self._expect("{")
        if self._skip() == "}":
            self._pos += 1
            self._end()
            return
        while True:
            if self._skip() != '"':
                raise self._error("expected a key in double quotes")
            key = self._value()
            self._expect(":")
            yield key, self._value()
            if self._expect(",}") == "}":
                self._end()
                return

    def items(self) -> Iterator[Any]:
        self._expect("[")
        if self._skip() == "]":
            self._pos += 1
            self._end()
            return
        while True:
            yield self._value()
            if self._expect(",]") == "]":
                self._end()
                return

    def _end(self) -> None:
        if self._skip():
            raise self._error("more data after the JSON value")


def _shape_of(data: Any) -> _Source:
    if isinstance(data, dict) and not any(k.startswith("$") for k in data):
        return _Source("pairs", iter(list(data.items())))
    if isinstance(data, list):
        return _Source("items", iter(data))
    return _Source("value", iter([data]))


# --- import -------------------------------------------------------------------------------------


@dataclass
class ImportReport:
    """What an import did."""

    entries: int
    transactions: int
    mode: str  # "merged" or "replaced"
    path: str


def import_data(heap: Any, raw: IO[bytes], *, path: str = "state", replace: bool = False,
                name: str = "the file", batch: int = BATCH, bar: Any = None) -> ImportReport:
    """Import the tagged JSON in `raw` at `path`: merge (a dict's entries and an object's
    attributes set, a list extended, a set updated) or, with `replace`, put it in place
    of what is there. All or nothing (see the module's docstring)."""
    from ._ops import _Quiet

    if batch < 1:
        raise _usage(f"--batch {batch}: give 1 or more entries per transaction")
    steps = parse_path(path)
    shown = _show(steps)
    bar = bar if bar is not None else _Quiet()
    _check_target(heap, steps, replace)
    with _Interrupts() as stops:
        source = _open_source(raw, name, bar)
        first = _take(source.entries, batch, stops)
        if len(first) < batch or source.shape == "value":  # the whole file: one transaction
            with stops.transaction():
                n = _apply_direct(heap, steps, source.shape, first, replace, f"import {name} into {shown}")
            _too_late(stops)
            return ImportReport(n, 1, "replaced" if replace else "merged", shown)
        return _import_staged(heap, steps, source, first, replace, name, batch, stops)


def _take(it: Iterator[Any], n: int, stops: _Interrupts) -> list[Any]:
    out = []
    for item in it:
        stops.check()
        out.append(item)
        if len(out) >= n:
            break
    stops.check()
    return out


def _too_late(stops: _Interrupts) -> None:
    if stops.came:
        print("durable-heap: Ctrl-C came during the last commit: the import was completed",
              file=sys.stderr, flush=True)


def _check_target(heap: Any, steps: list[Step], replace: bool) -> None:
    """Refuse a path that does not exist (or whose parent does not, with `replace`)
    before anything is read or written."""
    from ._containers import Dict
    from ._heap import read_transaction
    from ._state import Object

    with read_transaction(heap):
        parent, value = _resolve(heap.state, steps, allow_missing_last=replace)
        if not replace:
            _mergeable(value, _show(steps))
        elif steps:
            _settable(parent, steps[-1], _show(steps[:-1]))
            if value is None and not _has(parent, steps[-1]) and not isinstance(parent, (dict, Dict, Object)):
                raise _usage(f"--path {_show(steps)}: {_show(steps[:-1])} has no such item: "
                             "--replace sets an item of a list that exists")


def _has(parent: Any, step: Step) -> bool:
    try:
        return _child(parent, step, "")[0]
    except DurableHeapError:
        return False


def _mergeable(target: Any, where: str) -> None:
    from ._containers import Dict, List, Set
    from ._state import Object

    if not isinstance(target, (Dict, List, Set, Object)):
        raise _usage(f"{where} is {_kind(target)}: an import merges into a dict, list, set or "
                     "object; --replace puts the file's value in its place")


def _settable(parent: Any, step: Step, where: str) -> None:
    from ._containers import Dict, List
    from ._state import Object

    if not isinstance(parent, (Dict, List, Object)):
        raise _usage(f"{where} is {_kind(parent)}: --replace cannot set a value inside it")
    if isinstance(parent, Object) and not (isinstance(step[1], str) and step[1].isidentifier()):
        raise _usage(f"{where} is {_kind(parent)}: its attributes are names, not {step[1]!r}")


def _decode_entries(decoder: Any, shape: str, raw_entries: list[Any], shown: str) -> list[Any]:
    if shape == "pairs":
        return [(k, decoder.decode(v, f"{shown}[{k!r}]")) for k, v in raw_entries]
    if shape == "items":
        return [decoder.decode(v, f"{shown}[...]") for v in raw_entries]
    return [decoder.decode(v, shown) for v in raw_entries]


def _whole(shape: str, entries: list[Any]) -> Any:
    """The file's value from its decoded entries (a small file, or the staged container)."""
    if shape == "pairs":
        return dict(entries)
    if shape == "items":
        return list(entries)
    return entries[0] if entries else None


def _apply_direct(heap: Any, steps: list[Step], shape: str, raw_entries: list[Any], replace: bool,
                  note: str) -> int:
    from ._jsonform import Decoder

    shown = _show(steps)
    for attempt in heap.attempts(note=note):
        with attempt as state:
            decoded = _decode_entries(Decoder(durable=True), shape, raw_entries, shown)
            _put(state, steps, shape, decoded if shape != "value" else _whole(shape, decoded), replace)
    return len(raw_entries)


def _put(state: Any, steps: list[Step], shape: str, incoming: Any, replace: bool) -> None:
    """Merge `incoming` (a list of pairs, a list of items, or one value) into the value at
    `steps`, or put it in its place (`replace`)."""
    from ._containers import Dict, List, Set
    from ._state import Object, State

    shown = _show(steps)
    parent, target = _resolve(state, steps, allow_missing_last=replace)
    if replace:
        value = dict(incoming) if shape == "pairs" and not isinstance(incoming, Dict) else incoming
        if shape == "items" and isinstance(incoming, list):
            value = list(incoming)
        if not steps:
            _replace_state(state, value)
            return
        _settable(parent, steps[-1], _show(steps[:-1]))
        key = steps[-1][1]
        if isinstance(parent, Object):
            setattr(parent, key, value)
        else:
            parent[int(key) if isinstance(parent, List) and str(key).isdigit() else key] = value
        return
    _mergeable(target, shown)
    pairs = _pairs(shape, incoming)
    if pairs is not None:
        if isinstance(target, Object):
            for k, v in pairs:
                if not (isinstance(k, str) and k.isidentifier()):
                    raise _usage(f"{shown} is {_kind(target)}: {k!r} cannot be an attribute name")
                if isinstance(target, State):
                    target[k] = v
                else:
                    setattr(target, k, v)
            return
        if isinstance(target, Dict):
            target.update(pairs)
            return
    elif isinstance(target, List) and (shape == "items" or isinstance(incoming, (list, List, tuple))):
        target.extend(incoming)
        return
    elif isinstance(target, Set) and isinstance(incoming, (set, frozenset, Set, list, List)):
        target.update(incoming)
        return
    raise _usage(f"{shown} is {_kind(target)}: the file holds {_describe(shape, incoming)}, which "
                 "cannot be merged into it (--replace puts it in its place)")


def _pairs(shape: str, incoming: Any) -> list[tuple[Any, Any]] | Any | None:
    from ._containers import Dict
    from ._state import Object

    if shape == "pairs":
        return incoming.items() if isinstance(incoming, Dict) else incoming
    if isinstance(incoming, (dict, Dict)):
        return list(incoming.items())
    if isinstance(incoming, Object):
        return list(incoming._dh_as_dict().items())
    return None


def _describe(shape: str, incoming: Any) -> str:
    if shape == "pairs":
        return "a JSON object"
    if shape == "items":
        return "a JSON array"
    return _kind(incoming)


def _replace_state(state: Any, value: Any) -> None:
    from ._containers import Dict
    from ._state import Object

    items = (value._dh_as_dict() if isinstance(value, Object) else value)
    if not isinstance(items, (dict, Dict)):
        raise _usage(f"state is replaced by the file's attributes: the file holds {_kind(value)}, "
                     "not a JSON object")
    bad = [k for k in items if not (isinstance(k, str) and k.isidentifier())]
    if bad:
        raise _usage(f"state: {bad[0]!r} cannot be an attribute name")
    for k in list(state):
        if k not in items:
            del state[k]
    for k, v in items.items():
        state[k] = v


# --- a big import: staged, then put in place -----------------------------------------------


def _import_staged(heap: Any, steps: list[Step], source: _Source, first: list[Any], replace: bool,
                   name: str, batch: int, stops: _Interrupts) -> ImportReport:
    from ._containers import Dict, List
    from ._inline import moved
    from ._jsonform import Decoder

    shown = _show(steps)
    import_id = uuid.uuid4().hex
    container: Any = Dict() if source.shape == "pairs" else List()
    with stops.transaction():
        _begin_staging(heap, import_id, shown, container)
    decoder = Decoder(durable=True)
    entries = transactions = 0
    try:
        pending = first
        while pending:
            # The staged container is this import's alone: no other transaction writes it,
            # so these commits cannot conflict (no retry, which would decode twice).
            note = f"import {name} into {shown}: staging entries {entries + 1:,}-{entries + len(pending):,}"
            with stops.transaction(), heap.transaction(note):
                staged = _staged(heap, import_id)["data"]
                decoded = _decode_entries(decoder, source.shape, pending, shown)
                if source.shape == "pairs":
                    staged.update(decoded)
                else:
                    staged.extend(decoded)
            entries += len(pending)
            transactions += 1
            heap.connection.cacheGC()  # committed: their objects may become ghosts again
            pending = _take(source.entries, batch, stops)
        with stops.transaction():
            for attempt in heap.attempts(note=f"import {name} into {shown}: {entries:,} entries "
                                         f"({'replace' if replace else 'merge'})"):
                with attempt as state:
                    record = _staged(heap, import_id)
                    staged = record["data"]
                    if replace:
                        _put(state, steps, source.shape, staged, True)
                    elif source.shape == "pairs":
                        # Inline values as their raw plain values: copied inline into the
                        # target, not promoted to records (the staged container goes).
                        _put(state, steps, "pairs", [(k, moved(v)) for k, v in staged.items()], False)
                    else:
                        _put(state, steps, "items", list(map(moved, staged)), False)
                    root = heap.connection.root()
                    del root[IMPORTS_KEY][import_id]
                    if not root[IMPORTS_KEY]:
                        del root[IMPORTS_KEY]  # no import under way: the root as before
        transactions += 1
    except BaseException:
        with stops.transaction():
            _drop_staged(heap, import_id)
        raise
    _too_late(stops)
    return ImportReport(entries, transactions, "replaced" if replace else "merged", shown)


def _staged(heap: Any, import_id: str) -> Any:
    return heap.connection.root()[IMPORTS_KEY][import_id]


def _begin_staging(heap: Any, import_id: str, shown: str, container: Any) -> None:
    """Note this import under `IMPORTS_KEY`, dropping what killed imports left there."""
    from ._containers import Dict

    now = datetime.datetime.now(datetime.timezone.utc)
    for attempt in heap.attempts(note=f"import into {shown}: begin"):
        with attempt:
            root = heap.connection.root()
            imports = root.get(IMPORTS_KEY)
            if imports is None:
                imports = root[IMPORTS_KEY] = Dict()
            for old in [k for k, v in imports.items() if now - v["started"] > STALE]:
                del imports[old]
            imports[import_id] = {"started": now, "target": shown, "data": container}


def _drop_staged(heap: Any, import_id: str) -> None:
    """Forget the staged entries of a stopped import (a pack removes their records)."""
    try:
        for attempt in heap.attempts(note="import stopped: its staged entries dropped"):
            with attempt:
                root = heap.connection.root()
                imports = root.get(IMPORTS_KEY)
                if imports is not None and import_id in imports:
                    del imports[import_id]
                    if not imports:
                        del root[IMPORTS_KEY]
    except Exception as exc:  # noqa: BLE001 - the error that stopped the import matters more
        print(f"durable-heap: the stopped import's staged entries could not be dropped ({exc}); "
              "nothing in state refers to them, and the next import drops them", file=sys.stderr)


class _Interrupts:
    """Ctrl-C during an import, taken at safe points only.

    ZODB trap: a KeyboardInterrupt inside a commit's second phase (FileStorage's
    ``_finish``) makes the storage close itself ("Failure in _finish. Closing."), so
    neither that commit nor the clean-up after it can be relied on. While the import
    runs, Ctrl-C only sets a flag, which `check` turns into KeyboardInterrupt between
    two entries or batches; outside a transaction (reading a slow pipe) a second Ctrl-C
    raises at once. The last transaction is not interrupted at all: a Ctrl-C during it
    is said to have come too late.
    """

    def __init__(self) -> None:
        self.came = False
        self.depth = 0  # > 0 inside a transaction
        self._previous: Any = None
        self._main = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> _Interrupts:
        if self._main:
            self._previous = signal.signal(signal.SIGINT, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._main:
            signal.signal(signal.SIGINT, self._previous)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.came and not self.depth:
            raise KeyboardInterrupt
        self.came = True

    def check(self) -> None:
        """Raise KeyboardInterrupt if Ctrl-C came: call it only where stopping is safe."""
        if self.came and not self.depth:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """A block that Ctrl-C never interrupts (checked after it)."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


# --- call --each --------------------------------------------------------------------------------


def call_each(invoke: Callable[[tuple[Any, ...], dict[str, Any]], str], lines: IO[str], *, name: str,
              bar: Any, out: IO[str]) -> int:
    """Call ``invoke(args, kwargs)`` once per line of `lines` (each call one action, its
    own transaction) and print each result as a line of `out`.

    A line is tagged JSON: an array is the positional arguments, an object the keyword
    arguments, ``{"args": [...], "kwargs": {...}}`` both, any other value one positional
    argument; empty lines are skipped. Ctrl-C stops between two calls (a second one
    stops the call in flight, which is rolled back): the calls made are committed, the
    rest are not made. Returns the number of calls made.
    """
    from ._jsonform import loads

    done = 0
    stop: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    previous: Any = None
    if main:
        def on_interrupt(signum: int, frame: Any) -> None:
            if stop:
                raise KeyboardInterrupt
            stop.append(signum)

        previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        for number, line in enumerate(lines, 1):
            if stop:
                break
            bar.update(len(line.encode("utf-8", "replace")))
            if not line.strip():
                continue
            try:
                value = loads(line)
            except JSONFormError as exc:
                raise JSONFormError(f"{name} line {number}: {exc}; {_made(done)}") from None
            a, k = _arguments(value)
            try:
                text = invoke(a, k)
            except BaseException:
                print(f"durable-heap: {name} line {number} failed; {_made(done)}", file=sys.stderr,
                      flush=True)
                raise
            print(text, file=out, flush=True)
            done += 1
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    if stop:
        print(f"durable-heap: interrupted after {done:,} call{'s' if done != 1 else ''}, each "
              "committed; the rest were not made", file=sys.stderr, flush=True)
        raise KeyboardInterrupt
    return done


def _made(done: int) -> str:
    return (f"the {done:,} call{'s' if done != 1 else ''} before it committed, the rest not made"
            if done else "no call was made")


def _arguments(value: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(value, list):
        return tuple(value), {}
    if isinstance(value, dict) and set(value) <= {"args", "kwargs"} and value and (
            isinstance(value.get("args", []), list) and isinstance(value.get("kwargs", {}), dict)):
        return tuple(value.get("args", [])), dict(value.get("kwargs", {}))
    if isinstance(value, dict) and all(isinstance(k, str) and k.isidentifier() for k in value):
        return (), value
    return (value,), {}


def file_size(path: str) -> int | None:
    """The size of a regular file (a progress bar's total), else None (a pipe, stdin)."""
    try:
        return os.path.getsize(path) if os.path.isfile(path) else None
    except OSError:
        return None


# --- the commands -------------------------------------------------------------------------------

EXAMPLES = {
    "export": "example:\n  durable-heap export tracker.py > tracker.json\n"
              "  durable-heap export tracker.py --path state.users -o users.json\n"
              "  durable-heap export tracker.py --path \"state.users['ann']\" --storage zeo://db:8100",
    "import": "example:\n  durable-heap import tracker.py users.json --path state.users      # merge\n"
              "  durable-heap import tracker.py tracker.json --replace --storage new.fs\n"
              "  curl -s https://example.com/seed.json | durable-heap import tracker.py - --path state.seed",
}


def add_commands(sub: Any, common: Callable[[Any], None]) -> dict[str, Any]:
    """Add ``export`` and ``import`` to the ``durable-heap`` parser; each sets ``run``."""
    import argparse

    made: dict[str, Any] = {}
    for name, text, run in (
        ("export", "write the state, or the part at --path, as JSON (tagged where JSON lacks a kind)",
         _export),
        ("import", "load JSON into the state, or at --path: merged into what is there, or --replace; "
         "all or nothing", _import),
    ):
        p = sub.add_parser(name, help=text, description=text + ". See docs/operations.md.",
                           epilog=EXAMPLES[name], formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("program", help="the program: a .py file or a package folder")
        p.set_defaults(run=run)
        made[name] = p
    exp, imp = made["export"], made["import"]
    exp.add_argument("--path", default="state", metavar="PATH",
                     help="the part to export: state.users, state.users['ann'], state.items[0] "
                     "(default: state)")
    exp.add_argument("-o", "--output", metavar="FILE",
                     help="write FILE (whole or not at all) instead of stdout")
    imp.add_argument("file", metavar="FILE", help="the JSON file (as export writes it); - reads stdin")
    imp.add_argument("--path", default="state", metavar="PATH",
                     help="where to import: state (default), state.users, ...")
    imp.add_argument("--replace", action="store_true",
                     help="put the file's value in place of what is at --path (default: merge: a "
                     "dict's entries and an object's attributes set, a list extended, a set updated)")
    imp.add_argument("--batch", type=int, default=BATCH, metavar="N",
                     help=f"entries per transaction while a big file is staged (default {BATCH:,})")
    imp.add_argument("--no-deploy", action="store_true",
                     help="use the current version even if the program file changed")
    for p in made.values():
        common(p)
    return made


def _export(args: Any) -> int:
    from ._ops import _open
    from ._versions import load_discarded

    with _open(args, read_only=True) as heap:
        with contextlib.redirect_stdout(sys.stderr):  # the program's own prints
            load_discarded(heap, args.program)  # its classes, to read its objects
        if args.output is None:
            export_data(heap, args.path)
            return 0
        work = args.output + ".part"
        try:
            with open(work, "w", encoding="utf-8") as f:
                n = export_data(heap, args.path, f)
            os.replace(work, args.output)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(work)
            raise
    print(f"durable-heap: wrote {args.path} ({_entries(n)}) to {args.output}", file=sys.stderr)
    return 0


def _import(args: Any) -> int:
    import durable_heap

    from ._ops import _target, progress, waiting_notice
    from ._versions import load

    reading_stdin = args.file == "-"
    if not reading_stdin and not os.path.isfile(args.file):
        raise _usage(f"there is no file {args.file!r} to import")
    target = _target(args)
    with waiting_notice(target):
        heap = durable_heap.open(target, allow=args.allow)
    with heap:
        with contextlib.redirect_stdout(sys.stderr):  # the program's own prints
            program = load(heap, args.program, deploy=not args.no_deploy)
            program.module  # noqa: B018 - its classes, which the file's $object values name
        name = "stdin" if reading_stdin else args.file
        raw = contextlib.nullcontext(sys.stdin.buffer) if reading_stdin else open(args.file, "rb")  # noqa: SIM115
        size = None if reading_stdin else file_size(args.file)
        with raw as f, progress(size, f"import {os.path.basename(name)}", "B") as bar:
            report = import_data(heap, f, path=args.path, replace=args.replace, name=name,
                                 batch=args.batch, bar=bar)
    print(f"imported {_entries(report.entries)} of {name} into "
          f"{report.path} ({report.mode}, {report.transactions} transaction"
          f"{'s' if report.transactions != 1 else ''})")
    return 0


def _entries(n: int) -> str:
    return f"{n:,} entr{'y' if n == 1 else 'ies'}"
