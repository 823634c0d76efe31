"""A pack cut off between its two renames (FileStorage renames ``NAME`` to
``NAME.old``, then ``NAME.pack`` to ``NAME``): opening the heap refuses, says which
file to rename, and creates no empty heap in its place; either rename gives back
every commit.

A real subprocess packs a real heap file and is SIGKILLed right after the first
rename: its ``os.rename`` (which ZODB's pack looks up at each call) kills the
process once it has renamed the file to ``.old``. Nothing of the storage is mocked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import durable_heap as dh
from durable_heap.testing import subprocess_env

#: ``python -c PACK PATH``: packs the heap at PATH, SIGKILLed between pack's renames.
PACK = """
import os, signal, sys
import durable_heap as dh
real_rename = os.rename

def rename(src, dst, *args, **kwargs):
    real_rename(src, dst, *args, **kwargs)
    if str(dst).endswith(".old"):  # the first of pack's two renames is done
        os.kill(os.getpid(), signal.SIGKILL)

heap = dh.open(sys.argv[1])
os.rename = rename
heap.pack(days=0)
print("packed", flush=True)
"""


def _cut_off_pack(path: Path) -> None:
    with dh.open(path) as heap:
        for i in range(20):
            with heap.transaction() as state:
                state.counts = {**(state.get("counts") or {}), i: i}  # old revisions to pack away
    proc = subprocess.run([sys.executable, "-c", PACK, str(path)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    assert not path.exists()
    assert Path(f"{path}.old").exists() and Path(f"{path}.pack").exists()


@pytest.mark.parametrize("keep", [".pack", ".old"])
def test_a_pack_cut_off_between_its_renames_is_refused_and_says_what_to_do(
    heap_path: Path, keep: str
) -> None:
    """After the kill, ``dh.open`` raises StorageError naming both ways out and leaves
    the folder as it was (ZODB's FileStorage created a new, empty heap there: the
    heap looked empty, and its next commits went into a file beside the real data).
    Renaming either file as told opens the heap with all twenty commits."""
    heap_path.parent.mkdir(parents=True)
    _cut_off_pack(heap_path)
    with pytest.raises(dh.StorageError) as raised:
        dh.open(heap_path)
    message = str(raised.value)
    assert "a pack was cut off between its two renames" in message, message
    assert f"mv {heap_path}.pack {heap_path}" in message and f"mv {heap_path}.old {heap_path}" in message
    assert not heap_path.exists(), "an empty heap was created in place of the packed one"
    os.rename(f"{heap_path}{keep}", heap_path)
    with dh.open(heap_path) as heap:
        assert dict(heap.state.counts) == {i: i for i in range(20)}


def test_the_zodb_internals_the_check_relies_on() -> None:
    """FileStorage's pack renames the file to ``.old`` before it renames ``.pack`` over
    it (the window the check covers), and its constructor creates a missing file (why
    the check must come first); its ``load`` reads the current record by the index."""
    import inspect

    from ZODB.FileStorage import FileStorage as ZODBFileStorage

    pack = inspect.getsource(ZODBFileStorage.pack)
    first = pack.index("os.rename(self._file_name, oldpath)")
    assert first < pack.index("os.rename(self._file_name + '.pack', self._file_name)")
    init = inspect.getsource(ZODBFileStorage.__init__)
    assert "if exc.errno == errno.ENOENT:" in init and "create = 1" in init  # a missing file is made
    assert "_lookup_pos(oid)" in inspect.getsource(ZODBFileStorage.load)
