"""The stored format of a heap, in one place: root keys, format versions, class paths.

A heap outlives the code that wrote it, so what it stores is a contract with
every later durable_heap (and with the ZEO servers that import the classes
their records name). Changing anything listed here changes the format: bump
`FORMAT`, add a line to `FORMAT_SINCE`, keep reading the old layout (see
pypa/packaging's habit, docs/concepts.md), and keep tests/fixtures/legacy-0.1.fs
opening. tests/test_format.py pins every name below.

The ZODB root (a ``persistent.mapping.PersistentMapping``, oid 0) holds::

    "durable_heap.state"             -> State (or a program's declared subclass)
    "durable_heap.format"            -> int, the heap format (absent: 1, written by 0.1)
    "durable_heap.programs"          -> OOBTree  program name -> _ProgramRecord
    "durable_heap.classes"           -> OOBTree  class path -> True (the class registry)
    "durable_heap.classes.complete"  -> True     the registry lists users' classes too (0.3)

and, once a program declared named migrations or rewrote renamed classes (0.4)::

    "durable_heap.migrations"        -> OOBTree  program -> OOBTree  migration name ->
                                        (version number int, UTC datetime): ran once
    "durable_heap.rewrites"          -> OOBTree  old class path -> OOBTree {"new": path,
                                        "started"/"finished": UTC datetime | None,
                                        "records": int}: `durable-heap rewrite-classes`

and, once durable execution (`_workflows`, since 0.4) has been used::

    "durable_heap.workflows"         -> OOBTree  id -> WorkflowRecord
    "durable_heap.timers"            -> OOBTree  (deadline, seq) -> TimerEntry
    "durable_heap.promises"          -> OOBTree  name -> PromiseRecord
    "durable_heap.subscriptions"     -> OOBTree  topic -> tuple of (module, qualname)
    "durable_heap.crons"             -> OOBTree  cron id -> CronEntry
    "durable_heap.dead_letters"      -> OOBTree  seq -> TimerEntry
    "durable_heap.waiting"           -> OOBTree  (module, qualname, code hash, id) -> True
    "durable_heap.by_status"         -> OOBTree  status -> OOBTree (created, id) -> True
    "durable_heap.retention"         -> OOBTree  (deadline, id) -> True: ended workflows whose
                                        journal is dropped then (written since 0.4's session 11;
                                        before, a "prune" TimerEntry in the timers, still read);
                                        and (deadline, name, "promise") -> True: a promise
                                        resolved while nothing waited on it, dropped then if
                                        still nothing does (since session 12)

Record layouts (the attributes each persistent class pickles; ZODB stores
``(class path, state)`` per record, the state being the instance ``__dict__``
unless the class says otherwise):

* ``_state.Object`` / ``_state.State``: the instance ``__dict__``, attribute
  name -> value (plain values pickled inline, persistent ones as references).
* ``_counter.Counter``: the int value itself; merged at conflicts
  (``_p_resolveConflict``), also inside a ZEO server.
* ``_containers.Dict`` / ``_containers.Set`` (their base ``_Hashed``): small,
  ``(dict,)``; tree form, ``(None, index, entries, coll, len)`` where index is
  a ``_KeyIndex`` (all keys str) or an ``_Index`` (stable hashes), entries an
  ``_Entries`` of ``_EntryBucket`` (see ``_Hashed.__getstate__``).
* ``_containers.List``: ``(tail,)`` when small, ``(tail, root, size)`` otherwise,
  root a ``_Branch`` (``(kids, ends)``, ``ends[i]`` the items in ``kids[:i+1]``)
  over ``_Leaf`` records (a plain list of items each).
* Inline values (format 3, `_inline`): in the storage of a ``Dict`` (its small
  dict, the values of ``_EntryBucket`` entries) and of a ``List`` (its tail, its
  ``_Leaf`` items), a plain ``dict`` or ``list`` is a small value stored inline
  (its scalars, inline values and references); everywhere else values are as
  before. Nothing else in those states is a plain dict or list.
* ``_versions._ProgramRecord``: ``name`` str, ``current`` int (0: none yet),
  ``file_hash`` str | None (the source last deployed *from the file*),
  ``versions`` IOBTree number -> ``_VersionRecord``, ``globals`` IOBTree
  number -> ``Dict`` of the version's durable globals.
* ``_versions._VersionRecord``: ``number`` int, ``deployed_at`` datetime (UTC),
  ``source_hash`` str, ``files`` dict relative path -> source text,
  ``origin`` str, ``is_package`` bool, ``note`` str. Never changed after its
  deploy commits: its ``_p_serial`` is the deploy's transaction id.
* ``_workflows.WorkflowRecord``: ``id``, ``function`` (module, qualname), ``args``,
  ``kwargs``, ``status``, ``created``/``since``/``heartbeat``/``finished`` (epoch
  seconds), ``result``, ``error`` (type module, qualname, args, text), ``reason``,
  ``waiting`` tuple, ``timer`` key, ``journal`` a ``Journal`` (an IOBTree with
  buckets of 8) step -> entry: since format 4 a plain tuple ``(kind, name,
  detail, value, error, at)`` (``JournalEntry.stored``); in format 3, a
  ``JournalEntry`` (still read, and appended to with tuples),
  ``length``, ``retention``, ``code`` (its function's code hash), ``indexed`` key,
  ``retained`` key (in the retention tree; absent in records written before it).
* ``_workflows.PromiseRecord``: ``name``, ``resolved``, ``value``, ``at``, ``waiters``.
* Inline (not persistent; pickled inside the bucket that holds them, state a tuple):
  ``_workflows.JournalEntry`` (kind, name, detail, value, error, at; written
  until format 3),
  ``_workflows.TimerEntry`` (kind, target, args, kwargs, attempts, created, error,
  origin), ``_workflows.CronEntry`` (action, spec, args, kwargs, tz, missed, key).

Since format 2 every record is sealed: ``pickles + crc32(oid + pickles) + b"dh"``
(see `_integrity.MARK`, which owns the byte layout).
"""

from __future__ import annotations

__all__ = [
    "BASE_CLASSES",
    "CLASSES_KEY",
    "COMPLETE_KEY",
    "FORMAT",
    "FORMAT_KEY",
    "FORMAT_SINCE",
    "IMPORTS_KEY",
    "INLINE_CLASSES",
    "INLINE_FORMAT",
    "JOURNAL_FORMAT",
    "MIGRATIONS_KEY",
    "NEWEST_FORMAT",
    "PROGRAMS_KEY",
    "REWRITES_KEY",
    "ROOT_KEY",
    "STORED_CLASSES",
    "WORKFLOW_KEYS",
]

#: Key of the root `State` in the ZODB root.
ROOT_KEY = "durable_heap.state"
#: Key of the heap format marker (an int) in the ZODB root.
FORMAT_KEY = "durable_heap.format"
#: Key of the programs' version records in the ZODB root.
PROGRAMS_KEY = "durable_heap.programs"
#: Key of the registry of stored class paths in the ZODB root.
CLASSES_KEY = "durable_heap.classes"
#: Key of the marker (True) that the registry lists users' classes too (since 0.3).
COMPLETE_KEY = "durable_heap.classes.complete"
#: Key of the named migrations that ran (`_migrations`), per program, in the ZODB root.
MIGRATIONS_KEY = "durable_heap.migrations"
#: Key of the class-path rewrites of renamed classes (`_rewrite`) in the ZODB root. Each
#: entry is its own record, written when the rewrite starts and again when it finishes:
#: while the first revision survives, history from before the rewrite does too.
REWRITES_KEY = "durable_heap.rewrites"
#: Key of the imports being staged (`_exchange`): a Dict of import id -> {"started": a
#: datetime, "target": the path, "data": the staged Dict or List}; absent or empty
#: when no ``durable-heap import`` of a big file is under way.
IMPORTS_KEY = "durable_heap.imports"

#: The root keys of durable execution (`_workflows`), in the order listed above.
WORKFLOW_KEYS: tuple[str, ...] = (
    "durable_heap.workflows",
    "durable_heap.timers",
    "durable_heap.promises",
    "durable_heap.subscriptions",
    "durable_heap.crons",
    "durable_heap.dead_letters",
    "durable_heap.waiting",
    "durable_heap.by_status",
    "durable_heap.retention",
)

#: The heap format every heap gets (at creation, or raised to it at open).
FORMAT = 2
#: The format of a heap that holds inline values (`_inline`): raised from `FORMAT`
#: by the first commit that stores one, so that heaps that never do stay
#: readable by older versions, and older versions refuse the ones that do.
INLINE_FORMAT = 3
#: The format of a heap whose workflow journals hold plain tuples (`_workflows.JournalEntry.stored`)
#: instead of ``JournalEntry`` records: raised (from 2 or 3) by the first transaction of a
#: workflow run, so that versions that read journal entries as objects refuse it.
JOURNAL_FORMAT = 4
#: The newest format this version reads. A heap of a higher format is refused.
NEWEST_FORMAT = JOURNAL_FORMAT
#: The first durable_heap to write each format: 1 (0.2; heaps of 0.1 have no
#: marker and count as 1); 2 (0.3: records carry checksums, see `_integrity`);
#: 3 (0.4: small dicts and lists stored inline in their holder's record, see `_inline`);
#: 4 (0.4: journal entries as plain tuples, see `JOURNAL_FORMAT`).
FORMAT_SINCE = {1: "0.2", 2: "0.3", 3: "0.4", 4: "0.4"}

#: Every persistent class of durable_heap whose path records name. Never move,
#: rename or drop one: pickles name these paths, and a ZEO server imports them.
STORED_CLASSES: tuple[str, ...] = (
    "durable_heap._state.Object",
    "durable_heap._state.State",
    "durable_heap._counter.Counter",
    "durable_heap._containers.Dict",
    "durable_heap._containers.Set",
    "durable_heap._containers.List",
    "durable_heap._containers._Index",
    "durable_heap._containers._KeyIndex",
    "durable_heap._containers._Entries",
    "durable_heap._containers._EntryBucket",
    "durable_heap._containers._Leaf",
    "durable_heap._containers._Branch",
    "durable_heap._versions._ProgramRecord",
    "durable_heap._versions._VersionRecord",
    "durable_heap._workflows.WorkflowRecord",
    "durable_heap._workflows.Journal",
    "durable_heap._workflows.PromiseRecord",
)

#: Plain (not persistent) classes of durable_heap that records hold inline: their
#: paths are pickled too, so the same rule holds.
INLINE_CLASSES: tuple[str, ...] = (
    "durable_heap._workflows.JournalEntry",
    "durable_heap._workflows.TimerEntry",
    "durable_heap._workflows.CronEntry",
    # not a class: the function a stored `Workflow` handle is rebuilt with (since session 12)
    "durable_heap._workflows._stored_handle",
)

#: Persistent classes of durable_heap that are only bases: no record names them.
BASE_CLASSES: tuple[str, ...] = (
    "durable_heap._containers._Hashed",  # of Dict and Set
)
