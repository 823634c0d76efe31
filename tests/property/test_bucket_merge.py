"""Property tests: the conflict merge of a Dict's entries is exact, or it is a conflict.

Concurrent commits to one bucket of a Dict's entries tree are merged by
`_EntryBucket._p_resolveConflict` (and by `_Entries._p_resolveConflict` while the
tree keeps its one bucket inline). Its inputs are what ZODB's conflict resolution
unpickles: the states of the bucket before (old), as the other transaction
committed it, and as this one wants it. The merge here is checked against a
reference written independently: each entry is taken from the side that changed
it, where "changed" is exact (same type, same value place by place, floats by
their bits, references by their oid): never ``1`` for ``True`` or ``0.0`` for
``-0.0``. The merge may refuse (ConflictError: the transaction is retried); when
it does not, its result must be the reference's, exactly. Changes of different
entries' values only (no inserts, no deletes) must always merge.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ZODB.ConflictResolution import PersistentReference
from ZODB.POSException import ConflictError

from durable_heap import _containers as c

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ref(i: int) -> PersistentReference:
    """What conflict resolution unpickles a reference to a persistent object as."""
    return PersistentReference((i.to_bytes(8, "big"), "durable_heap._containers.Dict"))


atoms = st.one_of(
    st.integers(-2, 2), st.integers(2**62, 2**62 + 2), st.booleans(), st.none(),
    st.sampled_from([0.0, -0.0, 1.0, float("nan"), float("inf")]),
    st.text(alphabet="ab", max_size=2), st.binary(max_size=2),
    st.integers(1, 3).map(ref),
)
values = st.one_of(
    atoms,
    st.tuples(atoms, atoms),
    st.lists(atoms, max_size=3),  # inline values: plain lists and dicts (`_inline`)
    st.dictionaries(st.text(alphabet="xy", max_size=1), atoms, max_size=2),
)
keys = st.one_of(st.integers(0, 3), st.booleans(), st.text(alphabet="kq", max_size=1))
entries = st.tuples(keys, values)


def same(a: Any, b: Any) -> bool:
    """Exact sameness, the reference's own: types equal, values equal place by place."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return same(list(a.items()), list(b.items()))
    if isinstance(a, PersistentReference):
        return bool(a.oid == b.oid)
    return bool(a == b)


Entries = dict[int, Any]


def reference_merge(old: Entries, theirs: Entries, ours: Entries) -> Entries | None:
    """Each entry from the side that changed it; None when both changed one."""
    missing = object()
    out = {}
    for seq in sorted(old.keys() | theirs.keys() | ours.keys()):
        was, t, o = old.get(seq, missing), theirs.get(seq, missing), ours.get(seq, missing)
        t_changed = not (t is was or (t is not missing and was is not missing and same(t, was)))
        o_changed = not (o is was or (o is not missing and was is not missing and same(o, was)))
        if t_changed and o_changed:
            return None
        pick = o if o_changed else t
        if pick is not missing:
            out[seq] = pick
    return out


def copy(value: Any) -> Any:
    """An equal value that is a different object, as each unpickled state holds its own."""
    if isinstance(value, tuple):
        return tuple(copy(v) for v in value)
    if isinstance(value, list):
        return [copy(v) for v in value]
    if isinstance(value, dict):
        return {k: copy(v) for k, v in value.items()}
    if isinstance(value, PersistentReference):
        return PersistentReference(value.data)
    if isinstance(value, (str, bytes)):
        return type(value)(value[:0] + value)  # equal; a distinct object when not empty
    return value


LOOKALIKES = (0, 1, True, False, 0.0, -0.0, 1.0)


@st.composite
def side(draw: st.DrawFn, old: Entries, only_values: bool, values: Any, entries: Any) -> Entries:
    """One transaction's state of the bucket: some entries changed, deleted or added."""
    out = {seq: copy(e) for seq, e in old.items()}
    for seq in sorted(old):
        kinds = ["keep", "keep", "set", "lookalike", *([] if only_values else ["delete"])]
        what = draw(st.sampled_from(kinds))
        if what == "set":
            out[seq] = (old[seq][0], draw(values))
        elif what == "lookalike":  # equal by == but another type: 1 / True, 0.0 / -0.0, 1 / 1.0
            v = old[seq][1]
            numeric = type(v) in (int, bool, float)
            twins = [x for x in LOOKALIKES if numeric and x == v and not same(x, v)]
            out[seq] = (old[seq][0], draw(st.sampled_from(twins)) if twins else copy(v))
        elif what == "delete":
            del out[seq]
    if not only_values:
        for seq in draw(st.lists(st.integers(1, 20), max_size=2)):
            out.setdefault(seq, draw(entries))
    return out


def bucket_state(entries_by_seq: dict[int, Any]) -> Any:
    items: list[Any] = []
    for seq in sorted(entries_by_seq):
        items += [seq, entries_by_seq[seq]]
    return (tuple(items),) if items else None


def as_dict(state: Any) -> dict[int, Any]:
    items = state[0] if state else ()
    return dict(zip(items[0::2], items[1::2], strict=True))


def check(old: dict[int, Any], theirs: dict[int, Any], ours: dict[int, Any], tree: bool,
          must_merge: bool) -> None:
    states = [bucket_state(s) for s in (old, theirs, ours)]
    try:
        if tree:  # a tree whose one bucket is inline in its own record
            merged = c._Entries()._p_resolveConflict(*[((s,),) if s else None for s in states])
            merged = merged[0][0] if merged else None
        else:
            merged = c._EntryBucket()._p_resolveConflict(*states)
    except ConflictError:
        assert not must_merge, (old, theirs, ours)
        return
    expected = reference_merge(old, theirs, ours)
    assert expected is not None, ("merged changes both sides made", old, theirs, ours, merged)
    got = as_dict(merged)
    assert sorted(got) == sorted(expected)
    for seq, entry in expected.items():
        assert same(got[seq], entry), (seq, got[seq], entry)


#: Buckets whose keys are of one type and values of one (the merge's fast path):
#: a Dict of ints, of strings, a Set (values None).
uniform = st.sampled_from([st.integers(-2, 2), st.text(alphabet="ab", max_size=2), st.none(),
                           st.binary(max_size=1), st.booleans()])


@st.composite
def cases(draw: st.DrawFn, only_values: bool) -> tuple[dict[int, Any], dict[int, Any], dict[int, Any]]:
    if draw(st.booleans()):
        vals = draw(uniform)
        ents = st.tuples(draw(st.sampled_from([st.integers(0, 5), st.text(alphabet="kq", max_size=1)])), vals)
    else:
        vals, ents = values, entries
    old = dict(enumerate(draw(st.lists(ents, min_size=1, max_size=8)), start=1))
    return old, draw(side(old, only_values, vals, ents)), draw(side(old, only_values, vals, ents))


@SETTINGS
@given(cases(only_values=False), st.booleans())
def test_a_merge_is_exactly_the_reference_or_a_conflict(case: Any, tree: bool) -> None:
    check(*case, tree=tree, must_merge=False)


@SETTINGS
@given(cases(only_values=True), st.booleans())
def test_changes_to_different_entries_values_always_merge(case: Any, tree: bool) -> None:
    old, theirs, ours = case
    disjoint = reference_merge(old, theirs, ours) is not None
    check(old, theirs, ours, tree=tree, must_merge=disjoint)


@pytest.mark.parametrize("was, mine", [(1, True), (1, 1.0), (0.0, -0.0), (True, 1)])
def test_a_change_to_an_equal_value_of_another_type_is_kept(was: Any, mine: Any) -> None:
    """The C merge alone would see ``True == 1`` as no change and drop it (when the
    committed side made it)."""
    old = {1: ("a", was), 2: ("b", 1)}
    ours = {1: ("a", mine), 2: ("b", 1)}
    theirs = {1: ("a", was), 2: ("b", 5)}
    for tree in (False, True):
        check(old, theirs, ours, tree=tree, must_merge=True)
        check(old, ours, theirs, tree=tree, must_merge=True)


# --- the guard's resolver is ZODB's, byte for byte ---------------------------------------------


def _record(state: Any) -> bytes:
    """A stored record of `_EntryBucket` holding `state`, as ZODB pickles it (each
    `PersistentReference` a reference by its oid and class)."""
    import io

    from ZODB._compat import PersistentPickler
    from ZODB.ConflictResolution import persistent_id

    buf = io.BytesIO()
    pickler = PersistentPickler(persistent_id, buf, 3)
    pickler.dump(c._EntryBucket)
    pickler.dump(state)
    return buf.getvalue()


def _stored(storage: Any, oid: bytes, serial: bytes, data: bytes) -> bytes:
    """Store `data` as the next revision of `oid` (a real FileStorage commit); its serial."""
    from ZODB.Connection import TransactionMetaData

    txn = TransactionMetaData()
    storage.tpc_begin(txn)
    storage.store(oid, serial, data, "", txn)
    storage.tpc_vote(txn)
    return storage.tpc_finish(txn)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def plain_storage(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """ZODB's own FileStorage, unguarded: its ``tryToResolveConflict`` is ZODB's."""
    from ZODB.FileStorage import FileStorage

    storage = FileStorage(str(tmp_path_factory.mktemp("merge") / "raw.fs"))
    yield storage
    storage.close()


def _with_next(state: Any, nxt: int | None) -> Any:
    if state is None or nxt is None:
        return state
    return (state[0], PersistentReference((nxt.to_bytes(8, "big"), c._EntryBucket)))


@SETTINGS
@given(cases(only_values=False), st.one_of(st.none(), st.integers(1, 3)))
def test_the_guards_resolver_is_zodbs_byte_for_byte(plain_storage: Any, case: Any, nxt: int | None) -> None:
    """`_allow._resolve_checked` (which checks each global as it unpickles) returns what
    ZODB's own ``tryToResolveConflict`` returns for the same stored records, byte for
    byte, or raises the same ConflictError; it may leave a merge to the full path
    (None) only where ZODB's own resolver refuses it too."""
    from ZODB.utils import z64

    old, theirs, ours = (_with_next(bucket_state(s), nxt) for s in case)
    oid = plain_storage.new_oid()
    old_serial = _stored(plain_storage, oid, z64, _record(old))
    committed_serial = _stored(plain_storage, oid, old_serial, _record(theirs))
    newpickle = _record(ours)

    zodb = _compare_merges(plain_storage, oid, committed_serial, old_serial, newpickle)
    if isinstance(zodb, bytes):
        # As on a hot bucket: the merge is stored, and the next one merges against it
        # (its state kept by the first merge) from the revision before.
        merged_serial = _stored(plain_storage, oid, committed_serial, zodb)
        _compare_merges(plain_storage, oid, merged_serial, committed_serial, newpickle)


def _compare_merges(storage: Any, oid: bytes, committed_serial: bytes, old_serial: bytes,
                    newpickle: bytes) -> Any:
    """ZODB's resolver's outcome, checked to be `_resolve_checked`'s in every way."""
    from ZODB.ConflictResolution import tryToResolveConflict

    from durable_heap import _allow

    def outcome(resolve: Any) -> Any:
        try:
            return resolve()
        except ConflictError as exc:
            return ("conflict", exc.oid, exc.serials)

    zodb = outcome(lambda: tryToResolveConflict(storage, oid, committed_serial, old_serial, newpickle))
    # Without kept states, then twice with the states kept across examples (the second
    # time old and committed come from there, with references from the shared factory).
    for states in (None, _KEPT, _KEPT):
        ours_ = outcome(lambda: _allow._resolve_checked(  # noqa: B023 - called at once
            storage, _allow.Allowlist(), oid, committed_serial, old_serial, newpickle, b"", states))
        if ours_ is None:
            assert isinstance(zodb, tuple), "a merge ZODB makes was left to the full path"
        else:
            assert ours_ == zodb
        if states is not None and isinstance(ours_, bytes):
            # The merged state kept for the next merge is the stored record's, exactly,
            # with the shared factory's references.
            kept = states.get(ours_, _allow.Allowlist().check)
            if kept is not _allow._MISS:
                assert _allow._plain_pickle(c._EntryBucket, kept) == ours_
                for part in kept:
                    if isinstance(part, PersistentReference):
                        assert states.references.data[tuple(part.data)] is part
    return zodb


def _kept_states() -> Any:
    from durable_heap import _allow

    return _allow._States()


_KEPT = _kept_states()
