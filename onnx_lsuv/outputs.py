"""Writing a run's files as one transaction: nothing of them appears until all are written.

Every output (the model, its external data, the report, the plot, the weights) is written under
a temporary name in its own directory, flushed to disk, and renamed into place only at
``commit``, the model last. A failure, Ctrl-C or SIGTERM before that removes every temporary
file, and nothing the user had is changed. A model's external data goes to a file name that no
existing model uses (``OUT.data``, or ``OUT.<token>.data`` when that name is taken, as on a
rerun): the old model keeps pointing at its own, intact data until the new model replaces it,
so a model and its data are consistent at every instant. The data file the replaced model used
is removed after the rename.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import signal
import tempfile
import threading
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import InputError, OutputError
from .model_io import (
    DATA_FIELDS,
    EXTERNAL_THRESHOLD,
    GRAPH_INITIALIZER,
    MODEL_GRAPH,
    PROTOBUF_LIMIT,
    T_RAW,
    all_tensors,
    external_data_files,
    is_mapped,
    is_pending,
    len_header,
    mapped_range,
    raw_bytes,
    read_mapped,
    tensor_bytes,
    tensor_nbytes,
)

PAGE = 4096  # alignment of tensors of 1 MiB and more in a data file (memory-mappable)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def final_path(output: str | os.PathLike) -> str:
    """Where writing ``output`` lands: the file a symlink points to, else the path itself."""
    out = os.path.abspath(os.fspath(output))
    return os.path.realpath(out) if os.path.islink(out) else out


def check_output_path(output: str | os.PathLike, inputs: Iterable[str],
                      replaceable: Iterable[str] = (), what: str = "output") -> str:
    """Refuse an output that would clobber an input or cannot be written, before any work.

    Args:
        output: The path asked for.
        inputs: Every file the run reads (the model, each data file, external data files).
        replaceable: The inputs the output may replace (the model file itself, with
            --overwrite); never a data file or a model's external data. Defaults to none.
        what: The option's name, for the messages. Defaults to "output".

    Returns:
        The absolute path that will be written (through a symlink: its target).

    Raises:
        InputError: A path ending in a separator, a missing or unwritable directory, a
            directory in the file's place, or an input file (named).
    """
    raw = os.fspath(output)
    if raw.endswith((os.sep, "/")) or (os.altsep and raw.endswith(os.altsep)):
        raise InputError(f"{what} path {raw} ends in a path separator: give a file name "
                         f"(e.g. {raw}model.onnx)")
    out = final_path(raw)
    directory = os.path.dirname(out)
    if not os.path.isdir(directory):
        raise InputError(f"{what} directory does not exist: {directory}")
    if os.path.isdir(out):
        raise InputError(f"{what} path is a directory: {out}")
    allowed = {os.path.realpath(p) for p in replaceable}
    for src in inputs:
        same = os.path.exists(out) and os.path.exists(src) and os.path.samefile(out, src)
        if (same or os.path.abspath(src) == out) and os.path.realpath(src) not in allowed:
            model = what == "output" and src == next(iter(inputs), None)
            hint = "; pass --overwrite to replace it" if model else ""
            raise InputError(f"{what} path {raw} is an input of this run ({src}){hint}")
    try:  # writable? (os.access says yes to root on a read-only file system)
        fd, probe = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".probe",
                                     dir=directory)
        try:
            os.close(fd)
        finally:  # an interrupt here must not leave the probe behind
            os.unlink(probe)
    except OSError as err:
        raise InputError(f"cannot write {what} {raw}: {err.strerror} ({directory})") from err
    return out


class Transaction:
    """The files of one run, staged under temporary names and renamed into place together.

    Use as a context manager: leaving it by an exception before ``commit`` removes every staged
    file. ``written`` lists the final paths already renamed (for an honest interrupt message).
    """

    def __init__(self, protected: Iterable[str] = ()) -> None:
        self._staged: list[tuple[str, str, bool]] = []  # (temporary, final, is the model)
        self._created: list[str] = []  # files made at their final name (unique data files)
        self._obsolete: list[str] = []  # to remove once everything is in place
        self.protected = {os.path.realpath(p) for p in protected}
        self.written: list[str] = []
        self.committed = False

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if kind is not None and not self.committed:
            self.rollback()
        return False

    def stage(self, final: str, model: bool = False) -> str:
        """A new temporary file beside ``final`` (closed, empty) that ``commit`` renames."""
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(final)}.", suffix=".tmp",
                                   dir=os.path.dirname(final))
        os.close(fd)
        self._staged.append((tmp, final, model))
        return tmp

    def create_unique(self, directory: str, stem: str) -> tuple[str, int]:
        """A new file ``stem`` in ``directory``, or ``<stem minus .data>.<token>.data`` when
        that name exists; (name, open descriptor). Removed on rollback."""
        name = stem
        while True:
            path = os.path.join(directory, name)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                name = f"{stem[:-len('.data')]}.{secrets.token_hex(4)}.data"
                continue
            self._created.append(path)
            return name, fd

    def obsolete(self, path: str) -> None:
        """Remove ``path`` after the commit (never an input of the run)."""
        if os.path.realpath(path) not in self.protected:
            self._obsolete.append(path)

    def commit(self) -> list[str]:
        """Rename every staged file into place, the model last; then remove obsolete files.

        A rename that fails (an I/O error) before the model's undoes the renames before it: a
        file that was there before is put back from a hard link taken just before, a new one is
        removed. Ctrl-C and SIGTERM wait until the renames are done.

        Returns:
            The final paths written, in the order renamed.
        """
        mode = 0o666 & ~_umask()
        done: list[tuple[str, str | None]] = []  # (final, hard link to what it replaced)
        with signals_deferred():
            try:
                for tmp, final, model in sorted(self._staged, key=lambda s: s[2]):
                    backup = None
                    if os.path.exists(final) and not model:
                        backup = os.path.join(os.path.dirname(final),
                                              f".{os.path.basename(final)}."
                                              f"{secrets.token_hex(4)}.bak")
                        try:
                            os.link(final, backup)
                        except OSError:  # no hard links here: move the old file aside
                            os.rename(final, backup)
                    os.chmod(tmp, mode)  # mkstemp's 0600 is not what users expect
                    try:
                        os.replace(tmp, final)
                    except OSError as err:
                        if backup is not None and not os.path.exists(final):
                            os.replace(backup, final)
                            backup = None
                        raise OutputError(f"cannot write {final}: {err.strerror}") from err
                    done.append((final, backup))
                    if model:
                        self.written.extend(self._created)  # its data file, made in place
                    self.written.append(final)
                    if model:
                        self.committed = True
                self.committed = True
            except BaseException:
                if not self.committed:
                    for final, backup in reversed(done):
                        if backup is not None:
                            os.replace(backup, final)
                        else:
                            _remove(final)
                    self.written.clear()
                raise
            finally:
                for _, backup in done:
                    if backup is not None:
                        _remove(backup)
            for directory in {os.path.dirname(f) for f in self.written}:
                _sync_directory(directory)
            for path in self._obsolete:  # still held: an interrupt leaves no orphan
                if path not in self.written:
                    _remove(path)
        return self.written

    def rollback(self) -> None:
        for tmp, _, _ in self._staged:
            _remove(tmp)
        for path in self._created:
            _remove(path)
        self._staged.clear()
        self._created.clear()


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM back (in the main thread) until the block is done: a rename
    sequence, or a model's tensors swapped out and back, is never cut in half. A signal that
    arrives meanwhile is recorded and raised by its own handler right after the block.
    (Masking the signal in this thread is not enough: another thread of the process may
    receive it, and Python then runs the handler here at once.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = [signal.SIGINT, signal.SIGTERM]
    caught: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in held}
    for sig in held:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(caught):
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


def _sync_directory(directory: str) -> None:
    """fsync a directory, so that its renames survive a crash (where the OS allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sync_file(path: str) -> None:
    """fsync a staged file that another library wrote (the plot)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _write_all(fd: int, chunks: Iterable[bytes | memoryview], path: str) -> None:
    """Write, flush and fsync; an OSError names the file that could not be written."""
    try:
        with os.fdopen(fd, "wb", closefd=True) as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        why = {errno.ENOSPC: "no space left on the device",
               errno.EFBIG: "file too large for the file system"}.get(err.errno, err.strerror)
        raise OutputError(f"cannot write {path}: {why}") from err


def write_file(tx: Transaction, final: str, data: bytes | Iterable[bytes],
               model: bool = False) -> None:
    """Stage ``data`` for ``final`` in ``tx`` (``model``: renamed after every other file)."""
    tmp = tx.stage(final, model)
    _write_all(os.open(tmp, os.O_WRONLY), [data] if isinstance(data, bytes) else data, final)


def stage_model(tx: Transaction, model: onnx.ModelProto, output: str,
                external_data: bool | None = None,
                arrays: dict[str, np.ndarray] | None = None) -> list[str]:
    """Stage ``model`` (not modified) for ``output`` in ``tx``.

    Big tensors are written one at a time from where they are: a mapped tensor
    (``model_io.load_model(mapped=True)``) from its file, a PENDING one (see
    ``weights.WeightState.write``) from ``arrays``, the rest from the model; the whole
    serialised model is never held in memory beside it.

    Args:
        tx: The transaction.
        model: The model.
        output: The final .onnx path (``final_path`` of what was asked).
        external_data: Keep tensors of 1 KiB and more in a data file beside it (location
            relative to the model). Defaults to doing so only when the model is too large for
            one protobuf (2 GiB).
        arrays: The values of the model's PENDING tensors, by name. Defaults to none.

    Returns:
        The final paths: the model, then its data file if any.
    """
    arrays = arrays or {}
    directory = os.path.dirname(output)
    if os.path.exists(output) and os.path.getsize(output) < (64 << 20):
        ours = re.compile(re.escape(os.path.basename(output)) + r"(\.[0-9a-f]{8})?\.data")
        for old in external_data_files(output):  # what the model being replaced reads, if
            if os.path.dirname(old) == os.path.realpath(directory) and \
                    ours.fullmatch(os.path.basename(old)):  # named as onnx-lsuv names them
                tx.obsolete(old)
    if external_data is None:
        external_data = tensor_bytes(model) > PROTOBUF_LIMIT - (64 << 20)
    elif not external_data and tensor_bytes(model) > PROTOBUF_LIMIT - (64 << 20):
        raise InputError(f"the model holds {tensor_bytes(model) / 2**30:.2f} GiB of tensors: "
                         "over protobuf's 2 GiB, it can only be written with external data")
    big = [t for t in all_tensors(model) if tensor_nbytes(t) >= EXTERNAL_THRESHOLD
           and t.data_type != onnx.TensorProto.STRING] if external_data else []
    if not big:
        if any(_sourced(t) for t in model.graph.initializer):
            write_file(tx, output, _inline_chunks(model, arrays), model=True)
        else:
            write_file(tx, output, model.SerializeToString(), model=True)
        return [output]
    location, fd = tx.create_unique(directory, os.path.basename(output) + ".data")
    data_path = os.path.join(directory, location)
    # Each tensor's fields are swapped for a reference into the data file while the model is
    # serialised, then put back: the model is never copied. The data file is written after,
    # one tensor's bytes at a time.
    saved: list[tuple[onnx.TensorProto, bytes | None, onnx.TensorProto | None, bool | None]] = []
    try:
        with signals_deferred():  # the caller's model is whole again before any interrupt
            try:
                serialised, layout = _externalised(model, big, location, saved)
            finally:
                _put_back(saved)
    except BaseException:
        os.close(fd)
        raise
    _write_all(fd, _data_chunks(layout, arrays), data_path)
    del saved
    write_file(tx, output, serialised, model=True)
    return [output, data_path]


def _sourced(t: onnx.TensorProto) -> bool:
    return is_mapped(t) or is_pending(t)


STEP = 64 << 20  # bytes per read of a mapped tensor's file


def _tensor_chunks(t: onnx.TensorProto, arrays: dict[str, np.ndarray]):
    """A tensor's little-endian bytes, in pieces: from its array, its file, or itself."""
    if is_pending(t):
        yield raw_bytes(arrays[t.name], t.data_type)
    elif is_mapped(t):
        _, _, length = mapped_range(t)
        for start in range(0, length, STEP):
            yield read_mapped(t, start, min(STEP, length - start))
    else:
        yield _little_endian_bytes(t)


def _data_chunks(layout: list, arrays: dict[str, np.ndarray]):
    for pad, t in layout:
        yield b"\0" * pad
        yield from _tensor_chunks(t, arrays)


def _inline_chunks(model: onnx.ModelProto, arrays: dict[str, np.ndarray]):
    """``model`` serialised as one protobuf, in pieces: each mapped or PENDING initializer's
    raw_data streamed after the rest of its TensorProto (protobuf allows fields in any order),
    the graph's initializers after its other fields."""
    rest = onnx.ModelProto()
    rest.CopyFrom(model)  # small: the big tensors hold references only
    rest.ClearField("graph")
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    graph.ClearField("initializer")
    parts = []  # per initializer: (its bytes before raw_data, tensor or None)
    for t in model.graph.initializer:
        if _sourced(t):
            head = onnx.TensorProto()
            head.CopyFrom(t)
            del head.external_data[:]
            head.ClearField("data_location")
            n = tensor_nbytes(t)
            body = head.SerializeToString() + len_header(T_RAW, n)
            parts.append((len_header(GRAPH_INITIALIZER, len(body) + n) + body, t))
        else:
            body = t.SerializeToString()
            parts.append((len_header(GRAPH_INITIALIZER, len(body)) + body, None))
    graph_bytes = graph.SerializeToString()
    graph_len = len(graph_bytes) + sum(len(head) + (tensor_nbytes(t) if t is not None else 0)
                                       for head, t in parts)
    yield rest.SerializeToString() + len_header(MODEL_GRAPH, graph_len)
    yield graph_bytes
    for head, t in parts:
        yield head
        if t is not None:
            yield from _tensor_chunks(t, arrays)


def _put_back(saved: list) -> None:
    """Restore the tensors ``_externalised`` swapped out, as they were (a data_location that
    was not set stays unset: the model is then the same proto as before the save)."""
    for t, raw, original, located in saved:
        if original is not None:
            t.CopyFrom(original)
        else:
            del t.external_data[:]
            t.ClearField("data_location")
            if located:
                t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = raw


def _externalised(model: onnx.ModelProto, big: list[onnx.TensorProto], location: str,
                  saved: list) -> tuple[bytes, list]:
    """``model`` serialised with ``big`` as references into ``location``, and the data file's
    layout, (padding, tensor) in order; each tensor's own fields go to ``saved`` (for the
    caller to put back)."""
    offset = 0
    layout = []
    for t in big:
        length = tensor_nbytes(t)
        if _sourced(t) or not t.HasField("raw_data"):  # references, or typed fields (small)
            original = onnx.TensorProto()
            original.CopyFrom(t)
            saved.append((t, None, original, None))
        else:
            saved.append((t, t.raw_data, None, t.HasField("data_location")))
        pad = (-offset) % (PAGE if length >= (1 << 20) else 16)
        offset += pad
        layout.append((pad, saved[-1][2] if saved[-1][2] is not None else t))
        for f in DATA_FIELDS:
            t.ClearField(f)
        t.data_location = onnx.TensorProto.EXTERNAL
        del t.external_data[:]
        for key, value in (("location", location), ("offset", str(offset)),
                           ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        offset += length
    return model.SerializeToString(), layout


def _little_endian_bytes(t: onnx.TensorProto) -> bytes:
    if t.HasField("raw_data"):
        return t.raw_data
    return bytes(raw_bytes(numpy_helper.to_array(t), t.data_type))


def save_model_atomic(model: onnx.ModelProto, output: str | os.PathLike,
                      external_data: bool | None = None,
                      arrays: dict[str, np.ndarray] | None = None,
                      protected: Iterable[str] = ()) -> list[str]:
    """Write ``model`` to ``output`` atomically: an error or Ctrl-C on the way leaves the old
    file (and its data) as it was, and no temporary file behind.

    Args:
        model: The model (not modified).
        output: The .onnx path (through a symlink: the file it points to).
        external_data: Keep tensors of 1 KiB and more in a data file beside it (see
            ``stage_model``). Defaults to doing so only above protobuf's 2 GiB.
        arrays: The values of the model's PENDING tensors (see ``stage_model``). Defaults
            to none.
        protected: Files that must survive the save (the data files the model's mapped
            tensors read: never removed as the replaced model's obsolete data). Defaults to
            none.

    Returns:
        The paths written: the model, then its data file if any.

    Raises:
        OutputError: A file could not be written (disk full, file too big, ...).
    """
    out = final_path(output)
    with Transaction(protected) as tx:
        written = stage_model(tx, model, out, external_data, arrays)
        tx.commit()
    return written
