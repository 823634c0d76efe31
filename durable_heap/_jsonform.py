"""Tagged JSON: the one way durable_heap writes values that JSON lacks.

`durable-heap serve` answers ``{"result": ...}`` and reads arguments in this
form, and ``durable-heap export``/``import`` write and read it, so a value
looks the same everywhere. Plain JSON data stays plain JSON::

    >>> from durable_heap._jsonform import dumps, loads
    >>> dumps({"n": 1, "tags": ["a"]})
    '{"n": 1, "tags": ["a"]}'
    >>> import datetime
    >>> dumps((datetime.date(2026, 12, 1), b"hi", {3}))
    '{"$tuple": [{"$date": "2026-12-01"}, {"$bytes": "aGk="}, {"$set": [3]}]}'
    >>> loads(dumps((datetime.date(2026, 12, 1), b"hi", {3})))
    (datetime.date(2026, 12, 1), b'hi', {3})

Every other value is a JSON object with exactly one key, which starts with
``$`` (the tag). A JSON object with a ``$`` key among others, or an unknown
tag, is an error, never read as data. The tags:

====================  =============================================================
``$float``            ``"nan"``, ``"inf"``, ``"-inf"`` (JSON has no such numbers)
``$bytes``            base64 text; ``$bytearray`` the same for a bytearray
``$tuple``            a list; ``$set``, ``$frozenset`` a list of the members
``$dict``             ``[[key, value], ...]``: a dict with a key that is not a
                      string, or a string starting with ``$`` (else a JSON object)
``$datetime``         ISO text (offset kept); ``[iso, "Europe/Paris"]`` for a
                      zoneinfo zone (its wall time comes back as written, also
                      in a daylight-saving gap or repeated hour). ``$date``,
                      ``$time`` ISO text
``$timedelta``        ``[days, seconds, microseconds]``
``$decimal``          its text (``"1.10"``: digits kept); ``$fraction`` ``"1/3"``
``$complex``          ``[real, imag]``; ``$uuid`` its text
``$counter``          a `durable_heap.Counter`'s value
``$enum``             ``["module.Class", "MEMBER"]``
``$object``           ``{"class": "module.Class", "attrs": {...}}``: a
                      `durable_heap.Object` (or `State`) or a dataclass instance
``$shared``           ``[n, value]``: a container or object met more than once
                      (or inside itself); later places are ``{"$ref": n}``
====================  =============================================================

A big document can be read in pieces (``durable-heap import`` reads a file entry
by entry) with one `Decoder`, which keeps the ``$shared`` values for each later ``$ref``.

Durable containers (`Dict`, `List`, `Set`) are written as the builtins they
equal, and read back as builtins (assigned into state, they become durable
again). Reading ``$object`` and ``$enum`` names a class: only classes already
imported (a program's, once it is loaded) that are `Object` subclasses,
dataclasses or enums are made, never anything else a text names, unless the
caller passes its own ``resolve``.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import enum
import fractions
import json
import math
import sys
import uuid
from collections.abc import Callable
from typing import Any

from ._containers import Dict, List, Set
from ._counter import Counter
from ._errors import JSONFormError
from ._state import Object

__all__ = ["Decoder", "decode", "dump", "dumps", "encode", "loads", "register_tag", "resolve_loaded"]

Resolve = Callable[[str], Any]

#: Containers and objects that have an identity worth keeping (met twice: `$shared`).
_IDENTITY = (dict, list, set, bytearray, Dict, List, Set, Object)


def dumps(value: Any, **kwargs: Any) -> str:
    """`value` as tagged JSON text (keyword arguments go to `json.dumps`)."""
    kwargs.setdefault("ensure_ascii", False)
    return json.dumps(encode(value), allow_nan=False, **kwargs)


def dump(value: Any, fp: Any, **kwargs: Any) -> None:
    """Write `value` as tagged JSON text to the text file `fp` (as `dumps`), in pieces:
    the text is never held whole (``durable-heap export``)."""
    kwargs.setdefault("ensure_ascii", False)
    json.dump(encode(value), fp, allow_nan=False, **kwargs)


def loads(text: str | bytes, *, resolve: Resolve | None = None) -> Any:
    """The value of tagged JSON text (see `decode`)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise JSONFormError(f"not JSON: {exc}") from None
    return decode(data, resolve=resolve)


# --- writing ------------------------------------------------------------------------------


def encode(value: Any) -> Any:
    """`value` as JSON data (dicts, lists, strings, numbers, booleans, None), tagged where needed.

    Raises `JSONFormError` naming the place (``value['k'][2]``) of anything it
    cannot write: a function, a file, an object of a class that is neither a
    `durable_heap.Object` nor a dataclass.
    """
    counts: dict[int, int] = {}
    keep: list[Any] = []  # holds what was counted, so that no id is reused meanwhile
    _count(value, counts, keep)
    shared = {i for i, n in counts.items() if n > 1}
    return _Writer(shared).write(value, "value")


def _count(value: Any, counts: dict[int, int], keep: list[Any]) -> None:
    """How often each container or object is met (a second meeting stops the walk)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if not isinstance(v, _IDENTITY) and not _is_dataclass(v):
            if isinstance(v, (tuple, frozenset)):
                stack.extend(v)
            continue
        n = counts.get(id(v), 0)
        counts[id(v)] = n + 1
        if n:
            continue
        keep.append(v)
        if isinstance(v, (dict, Dict)):
            for k, item in v.items():
                stack.append(k)
                stack.append(item)
        elif isinstance(v, (list, set, List, Set)):
            stack.extend(v)
        elif isinstance(v, Object) or _is_dataclass(v):
            stack.extend(_attrs(v).values())


def _is_dataclass(v: Any) -> bool:
    return dataclasses.is_dataclass(v) and not isinstance(v, type)


def _attrs(obj: Any) -> dict[str, Any]:
    if isinstance(obj, Object):
        return obj._dh_as_dict()
    names = getattr(obj, "__dict__", None)
    attrs = dict(names) if names is not None else {}
    for f in dataclasses.fields(obj):  # slots dataclasses keep fields outside __dict__
        if f.name not in attrs and hasattr(obj, f.name):
            attrs[f.name] = getattr(obj, f.name)
    return attrs


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class _Writer:
    def __init__(self, shared: set[int]) -> None:
        self.shared = shared
        self.numbers: dict[int, int] = {}  # id -> its $shared number, once written
        self.active: set[int] = set()

    def write(self, v: Any, path: str) -> Any:
        if isinstance(v, enum.Enum):  # first: IntEnum and StrEnum members are ints and strs too
            return {"$enum": [_class_name(type(v)), v.name]}
        if v is None or isinstance(v, bool):
            return v
        if isinstance(v, str):
            return str(v)
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            if math.isnan(v):
                return {"$float": "nan"}
            if math.isinf(v):
                return {"$float": "inf" if v > 0 else "-inf"}
            return float(v)
        key = id(v)
        if key in self.numbers:
            return {"$ref": self.numbers[key]}
        if key in self.shared:
            n = self.numbers[key] = len(self.numbers)
            return {"$shared": [n, self._write(v, path)]}
        return self._write(v, path)

    def _write(self, v: Any, path: str) -> Any:  # noqa: C901 - one branch per kind, in one place
        if isinstance(v, (dict, Dict)):
            if all(isinstance(k, str) and not k.startswith("$") for k in v):
                return {k: self.write(item, f"{path}[{k!r}]") for k, item in v.items()}
            return {"$dict": [[self.write(k, f"{path} (a key)"), self.write(item, f"{path}[{k!r}]")]
                              for k, item in v.items()]}
        if isinstance(v, (list, List)):
            return [self.write(item, f"{path}[{i}]") for i, item in enumerate(v)]
        if isinstance(v, tuple):
            return {"$tuple": [self.write(item, f"{path}[{i}]") for i, item in enumerate(v)]}
        if isinstance(v, (set, Set)):
            return {"$set": self._members(v, path)}
        if isinstance(v, frozenset):
            return {"$frozenset": self._members(v, path)}
        if isinstance(v, bytes):
            return {"$bytes": base64.b64encode(v).decode("ascii")}
        if isinstance(v, bytearray):
            return {"$bytearray": base64.b64encode(bytes(v)).decode("ascii")}
        if isinstance(v, datetime.datetime):
            zone = getattr(v.tzinfo, "key", None)  # a zoneinfo.ZoneInfo: keep its name
            return {"$datetime": [v.isoformat(), zone] if isinstance(zone, str) else v.isoformat()}
        if isinstance(v, datetime.date):
            return {"$date": v.isoformat()}
        if isinstance(v, datetime.time):
            return {"$time": v.isoformat()}
        if isinstance(v, datetime.timedelta):
            return {"$timedelta": [v.days, v.seconds, v.microseconds]}
        if isinstance(v, decimal.Decimal):
            return {"$decimal": str(v)}
        if isinstance(v, fractions.Fraction):
            return {"$fraction": str(v)}
        if isinstance(v, complex):
            return {"$complex": [self.write(v.real, path), self.write(v.imag, path)]}
        if isinstance(v, uuid.UUID):
            return {"$uuid": str(v)}
        if isinstance(v, Counter):
            return {"$counter": v.value}
        if isinstance(v, Object) or _is_dataclass(v):
            key = id(v)
            if key in self.active:  # unreachable: a cycle always goes through `shared`
                raise JSONFormError(f"{path} contains itself")
            self.active.add(key)
            try:
                attrs = {k: self.write(item, f"{path}.{k}") for k, item in _attrs(v).items()}
            finally:
                self.active.discard(key)
            return {"$object": {"class": _class_name(type(v)), "attrs": attrs}}
        registered = _REGISTERED.get(type(v))
        if registered is not None:
            return {registered[0]: registered[1](v)}
        raise JSONFormError(
            f"{path} cannot be written as JSON: a {_class_name(type(v))} is not data "
            "(numbers, strings, containers, dates, bytes, Decimal, durable_heap.Object "
            "instances and dataclasses are)"
        )

    def _members(self, v: Any, path: str) -> list[Any]:
        members = [self.write(item, f"{path} (a member)") for item in v]
        try:  # a stable order where the members have one: the same set, the same text
            return sorted(members, key=lambda m: json.dumps(m, sort_keys=True))
        except (TypeError, ValueError):
            return members


# --- reading ------------------------------------------------------------------------------


def resolve_loaded(name: str) -> Any:
    """The class `name` (``module.Qual.Name``) if its module is imported already, else None.

    Never imports anything: a text cannot make this process load a module.
    """
    module, _, qual = name.rpartition(".")
    while module:
        mod = sys.modules.get(module)
        if mod is not None:
            obj: Any = mod
            for part in qual.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    return None
            return obj
        module, _, head = module.rpartition(".")
        qual = f"{head}.{qual}"
    return None


def decode(data: Any, *, resolve: Resolve | None = None) -> Any:
    """The value of JSON data written by `encode` (or by hand in the same form).

    `resolve` maps a class name of ``$object``/``$enum`` to the class (default:
    `resolve_loaded`); only `Object` subclasses, dataclasses and enums are made.
    Raises `JSONFormError` naming the place of a malformed or unknown tag.
    """
    return _Reader(resolve or resolve_loaded).read(data, "value")


class Decoder:
    """Reads many pieces of one document (``durable-heap import`` reads a big file entry by
    entry): a ``{"$ref": n}`` in one piece finds the ``$shared`` value of an earlier one.

    With ``durable=True`` a container met several times (``$shared``) is made as a
    durable `Dict`, `List` or `Set` at once, so that pieces assigned into a heap one
    by one (each assignment stores plain containers as copies of their own) keep
    referring to one stored container.
    """

    def __init__(self, *, resolve: Resolve | None = None, durable: bool = False) -> None:
        self._reader = _Reader(resolve or resolve_loaded, durable=durable)

    def decode(self, data: Any, path: str = "value") -> Any:
        """The value of one piece of JSON data; `path` names its place in errors."""
        return self._reader.read(data, path)


class _Reader:
    def __init__(self, resolve: Resolve, *, durable: bool = False) -> None:
        self.resolve = resolve
        self.shared: dict[int, Any] = {}
        # Shared containers: builtins, or durable ones made at once (see `Decoder`).
        self.new_list: Callable[[], Any] = List if durable else list
        self.new_dict: Callable[[], Any] = Dict if durable else dict
        self.durable = durable

    def read(self, d: Any, path: str) -> Any:
        if isinstance(d, list):
            return [self.read(item, f"{path}[{i}]") for i, item in enumerate(d)]
        if not isinstance(d, dict):
            if d is None or isinstance(d, (bool, int, float, str)):
                return d
            raise JSONFormError(f"{path}: {type(d).__name__} is not JSON data")
        tags = [k for k in d if isinstance(k, str) and k.startswith("$")]
        if not tags:
            return {k: self.read(v, f"{path}[{k!r}]") for k, v in d.items()}
        if len(d) != 1:
            raise JSONFormError(
                f"{path}: a JSON object with a key starting with '$' ({tags[0]!r}) must have "
                "that key alone (a tagged value); write a dict with such keys as {\"$dict\": "
                "[[key, value], ...]}"
            )
        tag = tags[0]
        try:
            return self._tagged(tag, d[tag], path)
        except JSONFormError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, ArithmeticError) as exc:
            raise JSONFormError(f"{path}: a malformed {tag} value {d[tag]!r} ({exc})") from None

    def _tagged(self, tag: str, v: Any, path: str) -> Any:
        scalar = _SCALARS.get(tag)
        if scalar is not None:
            return scalar(v)
        if tag in ("$tuple", "$set", "$frozenset"):
            return _COLLECTIONS[tag](self._list(v, path))
        if tag == "$dict":
            return {self._hashable(self.read(k, f"{path} (a key)"), path): self.read(item, f"{path}[{i}]")
                    for i, (k, item) in enumerate(_pairs(v))}
        if tag == "$complex":
            re, im = (self.read(x, path) for x in v)
            return complex(_num(re), _num(im))
        if tag == "$enum":
            name, member = v
            cls = self._class(_str(name), path)
            if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
                raise JSONFormError(f"{path}: {name} is not an enum")
            return cls[_str(member)]
        if tag == "$object":
            return self._object(v, path, None)
        if tag == "$shared":
            n, inner = v
            return self._shared(_int(n), inner, path)
        if tag == "$ref":
            n = _int(v)
            if n not in self.shared:
                raise JSONFormError(f"{path}: {{'$ref': {n}}} comes before its {{'$shared': [{n}, ...]}}")
            return self.shared[n]
        known = ", ".join(sorted([*_SCALARS, *_COLLECTIONS, "$dict", "$complex", "$enum", "$object",
                                  "$shared", "$ref"]))
        raise JSONFormError(f"{path}: unknown tag {tag!r} (known: {known})")

    def _shared(self, n: int, inner: Any, path: str) -> Any:
        """A value met several times: made empty first where it can contain a `$ref` to itself."""
        if isinstance(inner, list):
            out: Any = self.new_list()
            self.shared[n] = out
            out.extend(self.read(item, f"{path}[{i}]") for i, item in enumerate(inner))
            return out
        if isinstance(inner, dict) and not any(str(k).startswith("$") for k in inner):
            out = self.new_dict()
            self.shared[n] = out
            out.update((k, self.read(item, f"{path}[{k!r}]")) for k, item in inner.items())
            return out
        if isinstance(inner, dict) and len(inner) == 1 and "$dict" in inner:
            out = self.new_dict()
            self.shared[n] = out
            for i, (k, item) in enumerate(_pairs(inner["$dict"])):
                out[self._hashable(self.read(k, f"{path} (a key)"), path)] = self.read(item, f"{path}[{i}]")
            return out
        if isinstance(inner, dict) and len(inner) == 1 and "$object" in inner:
            return self._object(inner["$object"], path, n)
        value = self.read(inner, path)  # a set or bytearray: cannot contain itself
        if self.durable and isinstance(value, set):
            value = Set(value)
        self.shared[n] = value
        return value

    def _object(self, v: Any, path: str, shared: int | None) -> Any:
        if not (isinstance(v, dict) and isinstance(v.get("class"), str) and isinstance(v.get("attrs"), dict)):
            raise ValueError('expected {"class": "module.Class", "attrs": {...}}')
        cls = self._class(v["class"], path)
        is_object = isinstance(cls, type) and issubclass(cls, Object)
        if not is_object and not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise JSONFormError(
                f"{path}: {v['class']} is neither a durable_heap.Object subclass nor a dataclass: "
                "not made from JSON"
            )
        obj = cls.__new__(cls)
        if shared is not None:
            self.shared[shared] = obj
        for k, item in v["attrs"].items():
            value = self.read(item, f"{path}.{k}")
            if is_object:
                setattr(obj, k, value)  # Object's own __setattr__ makes its containers durable
            else:
                object.__setattr__(obj, k, value)  # frozen and slots dataclasses too
        return obj

    def _class(self, name: str, path: str) -> Any:
        cls = self.resolve(name)
        if cls is None:
            raise JSONFormError(
                f"{path}: no class {name} is loaded here (classes are looked up among the "
                "modules already imported, such as the program's)"
            )
        return cls

    def _list(self, v: Any, path: str) -> list[Any]:
        if not isinstance(v, list):
            raise ValueError("expected a list")
        return [self.read(item, f"{path}[{i}]") for i, item in enumerate(v)]

    @staticmethod
    def _hashable(k: Any, path: str) -> Any:
        try:
            hash(k)
        except TypeError:
            raise JSONFormError(f"{path}: a {type(k).__name__} cannot be a dict key") from None
        return k


def _float(v: Any) -> float:
    if v not in ("nan", "inf", "-inf"):
        raise ValueError("expected 'nan', 'inf' or '-inf'")
    return float(v)


def _datetime(v: Any) -> datetime.datetime:
    if isinstance(v, list):
        import zoneinfo

        text, zone = v
        at, tz = datetime.datetime.fromisoformat(_str(text)), zoneinfo.ZoneInfo(_str(zone))
        # The wall time as written, in the zone, with the fold its offset says: a time in
        # a spring gap (02:00 Europe/Paris on a change day, which `astimezone` makes 03:00,
        # the same instant) or the repeated autumn hour comes back as it was stored.
        for fold in (0, 1):
            local = at.replace(tzinfo=tz, fold=fold)
            if local.utcoffset() == at.utcoffset():
                return local
        return at.astimezone(tz)  # an offset the zone never had there: the same instant
    return datetime.datetime.fromisoformat(_str(v))


def _timedelta(v: Any) -> datetime.timedelta:
    days, seconds, micro = v
    return datetime.timedelta(days=_int(days), seconds=_int(seconds), microseconds=_int(micro))


def _decimal(v: Any) -> decimal.Decimal:
    try:
        return decimal.Decimal(_str(v))
    except decimal.InvalidOperation:
        raise ValueError("not a decimal number") from None


#: Tags whose value needs no further reading: tag -> its reader.
_SCALARS: dict[str, Callable[[Any], Any]] = {
    "$float": _float,
    "$bytes": lambda v: base64.b64decode(_str(v), validate=True),
    "$bytearray": lambda v: bytearray(base64.b64decode(_str(v), validate=True)),
    "$datetime": _datetime,
    "$date": lambda v: datetime.date.fromisoformat(_str(v)),
    "$time": lambda v: datetime.time.fromisoformat(_str(v)),
    "$timedelta": _timedelta,
    "$decimal": _decimal,
    "$fraction": lambda v: fractions.Fraction(_str(v)),
    "$uuid": lambda v: uuid.UUID(_str(v)),
    "$counter": lambda v: Counter(_int(v)),
}
_COLLECTIONS: dict[str, Callable[[list[Any]], Any]] = {"$tuple": tuple, "$set": set, "$frozenset": frozenset}

#: Types of the layers above written as a tag of their own (`register_tag`): type -> (tag, encode).
_REGISTERED: dict[type, tuple[str, Callable[[Any], Any]]] = {}


def register_tag(cls: type, tag: str, encode: Callable[[Any], Any], decode: Callable[[Any], Any]) -> None:
    """Write instances of `cls` as ``{tag: encode(value)}`` and read that back with `decode`.

    For a layer above this one (durable execution's workflow handles, ``$workflow``):
    this module cannot import it. `encode` returns plain JSON data."""
    _REGISTERED[cls] = (tag, encode)
    _SCALARS[tag] = decode


def _pairs(v: Any) -> list[tuple[Any, Any]]:
    if not isinstance(v, list) or not all(isinstance(p, list) and len(p) == 2 for p in v):
        raise ValueError("expected [[key, value], ...]")
    return [(p[0], p[1]) for p in v]


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected text, not {type(v).__name__}")
    return v


def _int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"expected an integer, not {type(v).__name__}")
    return v


def _num(v: Any) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise TypeError(f"expected a number, not {type(v).__name__}")
    return float(v)
