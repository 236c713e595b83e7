"""Loading models (from a path or a ModelProto), checked tensor by tensor, and saving them.

External data is read here, not by onnx's helper, so that the same rules hold whatever onnx is
installed (onnx 1.15 followed a symlink out of the model's directory; 1.23 refuses every
symlink, and reports a bad location as an uncaught ValidationError): a location must be
relative, stay inside the model's directory once normalised, and name a regular file there. A
symlink is followed when its target stays inside the model's directory, or, for a Hugging Face
hub snapshot (``.../snapshots/<rev>/model.onnx`` whose files link to ``../../blobs/<sha>``),
inside the snapshot's ``blobs`` directory. Tensors in If/Loop/Scan bodies count everywhere.
"""

from __future__ import annotations

import mmap
import os
import threading
from typing import Union

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from .errors import InputError

ModelLike = Union[onnx.ModelProto, str, os.PathLike]
PROTOBUF_LIMIT = 2**31 - 1  # bytes: a larger ModelProto cannot be serialised in one piece
EXTERNAL_THRESHOLD = 1024  # bytes: smaller tensors stay inside the .onnx file
# A main-graph initializer of at least this many bytes, loaded with ``mapped=True``, is not
# read: it stays in its file (the .onnx itself or its external data) and is memory-mapped
# when its values are needed. Its TensorProto says where: data_location EXTERNAL, and
# external_data location=MAPPED, path (absolute), offset and length.
MAP_MIN = 1 << 20
MAPPED = "onnx-lsuv-mapped"
_MAPPABLE = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
             onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
             onnx.TensorProto.UINT16, onnx.TensorProto.INT32, onnx.TensorProto.UINT32,
             onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}


def existing_file(path: str | os.PathLike, what: str, expected: str) -> str:
    """``path`` as a string; InputError if it is missing or a directory."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{what} file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"{what} path is a directory, expected {expected}: {path}")
    return path


def load_model(model: ModelLike, mapped: bool = False,
               files: list[str] | None = None) -> onnx.ModelProto:
    """A private copy of ``model``: the caller's ModelProto or file is never modified.

    Args:
        model: A ModelProto, or the path of an .onnx file (external data is read from its
            directory, subgraph tensors included).
        mapped: Leave the main graph's initializers of ``MAP_MIN`` bytes and more in their
            files, memory-mapped when read (``tensor_array``), rather than reading them into
            the ModelProto: for as long as the model is used, those files must stay as they
            are. Defaults to False.
        files: A list to which the external data files read are added (absolute, resolved).
            Defaults to none.

    Raises:
        InputError: The file is missing, unreadable or not an ONNX model; an external data
            location is unsafe or missing; a tensor holds fewer bytes than its shape says.
    """
    if isinstance(model, onnx.ModelProto):
        unloaded = next((t.name for t in _all_tensors(model, subgraphs=True)
                         if t.data_location == onnx.TensorProto.EXTERNAL
                         and not is_mapped(t)), None)
        if unloaded is not None:  # relative to what? Only the file's path can say
            raise InputError(f"tensor {unloaded!r} of the ModelProto given keeps its data in "
                             "an external file that was not loaded: pass the model's path "
                             "instead, or load it with onnx.load(path)")
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        check_tensor_sizes(copy, "the model")
        return copy
    path = existing_file(model, "model", "an .onnx file")
    loaded = _parse(path, mapped)
    base = os.path.dirname(os.path.abspath(path))
    graph_inputs = {i.name for i in loaded.graph.input}
    for t in loaded.graph.initializer:  # the main graph's: mapped, where asked, if big
        if t.data_location == onnx.TensorProto.EXTERNAL and not is_mapped(t):
            _note(files, _read_external(t, base, path, mapped and t.name not in graph_inputs))
    for t in _all_tensors(loaded, subgraphs=True):  # the rest: read
        if t.data_location == onnx.TensorProto.EXTERNAL and not is_mapped(t):
            _note(files, _read_external(t, base, path))
    check_tensor_sizes(loaded, path)
    return loaded


def _note(files: list[str] | None, path: str) -> None:
    if files is not None and path not in files:
        files.append(path)


def _parse(path: str, mapped: bool = False) -> onnx.ModelProto:
    try:
        if mapped:
            loaded = _parse_leaving_big_tensors(path)
        else:
            loaded = onnx.load(path, load_external_data=False)
    except OSError as err:
        raise InputError(f"cannot read the model {path}: {err.strerror or err}") from err
    except (DecodeError, RuntimeError, ValueError, IndexError) as err:
        # protobuf's own words ("unsupported wire type 4") say nothing to a user: what the
        # file looks like instead says what went wrong
        raise InputError(f"cannot read {path}: not an ONNX model: {_what_it_is(path)}") from err
    if not loaded.HasField("graph") or not loaded.opset_import:
        raise InputError(f"{path} is not an ONNX model (no graph or no opset): "
                         f"{_what_it_is(path)}")
    return loaded


# The first bytes of files that are given as MODEL by mistake, and what to do about each.
_SWAPPED = ("did you swap MODEL and --data? The model comes first: "
            "onnx-lsuv MODEL.onnx --data BATCH.npy -o OUT.onnx")
_LOOKS_LIKE = [
    (b"\x93NUMPY", "it is a NumPy .npy array (a data batch); " + _SWAPPED),
    (b"PK\x03\x04", None),  # a zip: see _what_zip
    (b"\x80", "it is a Python pickle (a PyTorch checkpoint saved with pickle, a joblib "
              "model): export the model to ONNX first (torch.onnx.export, skl2onnx)"),
    (b"\x89HDF", "it is an HDF5 file (a Keras .h5 model): export it to ONNX first (tf2onnx)"),
]


_EXPORT_FIRST = ("export the model to ONNX first (torch.onnx.export, tf2onnx, jax2onnx, "
                 "paddle2onnx), or use the one-call front ends in onnx_lsuv.frameworks")


def _what_zip(path: str) -> str:
    """What a zip archive given as MODEL holds: a data batch (.npz), a PyTorch checkpoint or
    a Keras model, by its members' names."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        names = []
    if names and all(n.endswith(".npy") for n in names):
        return "it is a NumPy .npz archive (a data batch); " + _SWAPPED
    if any(n.endswith("data.pkl") for n in names):
        return "it is a PyTorch checkpoint (torch.save: weights, no graph); " + _EXPORT_FIRST
    if "config.json" in names or any(n.endswith(".h5") for n in names):
        return "it is a Keras model file (.keras); " + _EXPORT_FIRST
    return "it is a zip archive, not an ONNX protobuf; " + _EXPORT_FIRST


def _what_it_is(path: str) -> str:
    """The likely cause, from the file's first bytes: a data batch given as MODEL, a
    framework checkpoint, a text file; the file is otherwise truncated or corrupt."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return "the file cannot be read"
    for magic, why in _LOOKS_LIKE:
        if head.startswith(magic):
            return why or _what_zip(path)
    if not head:
        return "the file is empty"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c.isspace() for c in text):
        return ("it is a text file (an ONNX model is binary protobuf; a textual .onnxtxt or "
                "a Git LFS pointer, not the model itself?)")
    return ("the file is not a protobuf ModelProto (truncated, corrupt, or another format); "
            "an ONNX model is written by an exporter such as torch.onnx.export or onnx.save")


def _external_info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _hub_blobs(base_real: str) -> str | None:
    """The ``blobs`` directory of the Hugging Face hub repository whose snapshot holds
    ``base_real``, if it is one."""
    parts = base_real.split(os.sep)
    for k in range(len(parts) - 2, 0, -1):
        # <cache>/models--org--name/snapshots/<rev>/...: the hub's own layout, nothing looser
        if parts[k] == "snapshots" and parts[k - 1].startswith(
                ("models--", "datasets--", "spaces--")):
            root = os.sep.join(parts[:k])
            blobs = os.path.join(root, "blobs")
            return blobs if os.path.isdir(blobs) else None
    return None


def _inside(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def external_path(tensor_name: str, location: str | None, base: str, source: str) -> str:
    """The file that an external-data ``location`` names, after the checks in the module
    docstring (absolute path of the file actually read).

    Raises:
        InputError: Naming the tensor, the location and what is wrong.
    """
    what = f"tensor {tensor_name!r} of {source}: external data location {location!r}"
    if not location:
        raise InputError(f"{what} is empty")
    norm = os.path.normpath(location)
    if os.path.isabs(location) or os.path.splitdrive(location)[0] or norm == os.pardir or \
            norm.startswith(os.pardir + os.sep):
        raise InputError(f"{what} is not a relative path inside the model's directory")
    full = os.path.join(base, norm)
    if not os.path.isfile(full):
        raise InputError(f"{what}: no such file beside the model ({full})")
    real, base_real = os.path.realpath(full), os.path.realpath(base)
    blobs = _hub_blobs(base_real)
    if not (_inside(real, base_real) or (blobs is not None and _inside(real, blobs))):
        raise InputError(f"{what} is a symlink to {real}, outside the model's directory "
                         "(only links that stay inside it, or into a Hugging Face hub "
                         "snapshot's blobs, are followed)")
    return real


def _read_external(t: onnx.TensorProto, base: str, source: str, mapped: bool = False) -> str:
    """Read one tensor's external bytes into ``raw_data`` (checked: location, length), or with
    ``mapped``, from ``MAP_MIN`` bytes on, only point at them; the file's resolved path."""
    info = _external_info(t)
    path = external_path(t.name, info.get("location"), base, source)
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("negative")
    except ValueError as err:
        raise InputError(f"tensor {t.name!r} of {source}: bad external data offset or "
                         f"length ({info.get('offset')!r}, {info.get('length')!r})") from err
    if mapped and t.data_type in _MAPPABLE and tensor_nbytes(t) >= MAP_MIN:
        size = os.path.getsize(path)
        have = size - offset if length is None else length
        if have != tensor_nbytes(t) or offset + have > size:
            raise InputError(f"tensor {t.name!r} of {source}: external data file {path} holds "
                             f"{max(0, min(have, size - offset))} of the {tensor_nbytes(t)} "
                             f"bytes its shape needs at offset {offset}: truncated or corrupt")
        _mark_mapped(t, path, offset, have)
        return path
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(-1 if length is None else length)
    except OSError as err:
        raise InputError(f"tensor {t.name!r} of {source}: cannot read its external data "
                         f"{info.get('location')!r} ({path}): {err.strerror}") from err
    if length is not None and len(data) != length:
        raise InputError(f"tensor {t.name!r} of {source}: external data file {path} holds "
                         f"{len(data)} of the {length} bytes at offset {offset}: truncated")
    t.raw_data = data
    del t.external_data[:]
    t.data_location = onnx.TensorProto.DEFAULT
    return path


# Files that mapped tensors read, kept open from the load on: an open file keeps its bytes
# even when its path is replaced or removed (a result saved over its own input, a temporary
# directory cleaned up). Keyed by the file's identity (device, inode, size, modification
# time), which a mapped tensor records; [file, holders]. ``hold_sources`` and
# ``release_sources`` count who needs them (an LSUVResult, a call); a file nobody holds stays
# open until the process ends.
_SOURCES: dict[str, list] = {}
_SOURCES_LOCK = threading.Lock()


def _identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _source_key(path: str) -> str:
    with _SOURCES_LOCK:
        f = open(path, "rb")
        key = _identity(os.fstat(f.fileno()))
        if key in _SOURCES:
            f.close()
        else:
            _SOURCES[key] = [f, 0]
        return key


def _mark_mapped(t: onnx.TensorProto, path: str, offset: int, length: int) -> None:
    key = _source_key(path)
    for f in DATA_FIELDS:
        t.ClearField(f)
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, value in (("location", MAPPED), ("path", path), ("offset", str(offset)),
                     ("length", str(length)), ("source", key)):
        entry = t.external_data.add()
        entry.key, entry.value = k, value


def source_keys(model: onnx.ModelProto) -> list[str]:
    """The open files that ``model``'s mapped tensors read."""
    return sorted({_external_info(t)["source"] for t in model.graph.initializer
                   if is_mapped(t)})


def hold_sources(keys: list[str]) -> None:
    with _SOURCES_LOCK:
        for key in keys:
            if key in _SOURCES:
                _SOURCES[key][1] += 1


def release_sources(keys: list[str]) -> None:
    """Let go of files ``hold_sources`` held; each is closed when nothing holds it."""
    with _SOURCES_LOCK:
        for key in keys:
            entry = _SOURCES.get(key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    entry[0].close()
                    del _SOURCES[key]


def _source_file(t: onnx.TensorProto):
    """The open file a mapped tensor reads: the one opened at load, or, once that was let
    go, the file at its path again if it is still the same file."""
    info = _external_info(t)
    key, path = info.get("source", ""), info["path"]
    with _SOURCES_LOCK:
        entry = _SOURCES.get(key)
        if entry is not None:
            return entry[0]
    try:
        f = open(path, "rb")
    except OSError as err:
        raise InputError(f"tensor {t.name!r}: {path} was removed since the model was loaded "
                         f"({err.strerror}): load the model again") from err
    if _identity(os.fstat(f.fileno())) != key:
        f.close()
        raise InputError(f"tensor {t.name!r}: {path} changed since the model was loaded: load "
                         "the model again")
    with _SOURCES_LOCK:
        if key in _SOURCES:
            f.close()
            return _SOURCES[key][0]
        _SOURCES[key] = [f, 0]
        return f


def read_mapped(t: onnx.TensorProto, offset: int = 0, size: int | None = None) -> bytes:
    """Bytes of a mapped tensor (``size`` from ``offset`` within it; all by default)."""
    path, start, length = mapped_range(t)
    size = length - offset if size is None else size
    data = os.pread(_source_file(t).fileno(), size, start + offset)
    if len(data) != size:
        raise InputError(f"tensor {t.name!r}: {path} holds {len(data)} of the {size} bytes at "
                         f"offset {start + offset}: it changed while it was used")
    return data


PENDING = "onnx-lsuv-pending"  # a tensor whose values are an array beside the model, by name


def mark_pending(t: onnx.TensorProto) -> None:
    """Leave ``t``'s values out: they are an array of the same name kept beside the model."""
    for f in DATA_FIELDS:
        t.ClearField(f)
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", PENDING


def is_pending(t: onnx.TensorProto) -> bool:
    return (t.data_location == onnx.TensorProto.EXTERNAL and len(t.external_data) == 1
            and t.external_data[0].value == PENDING)


def complete_model(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``model`` with every PENDING tensor written from ``arrays`` and every mapped one read
    in, in place (each tensor's bytes copied once)."""
    for t in model.graph.initializer:
        if is_pending(t):
            set_values(t, arrays[t.name])
        else:
            materialize(t)
    return model


def raw_bytes(value: np.ndarray, data_type: int) -> bytes | memoryview:
    """The raw_data of a tensor of ``data_type`` holding ``value``: its elements in that dtype,
    little-endian, 4-bit types two to a byte (a view of ``value`` where it already is so).
    What ``set_values`` writes into a tensor and what a streamed save writes in its place."""
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
    arr = np.asarray(value)
    if arr.dtype != dtype or not arr.flags.c_contiguous:
        arr = np.array(arr, dtype=dtype, order="C")
    if dtype.num >= 256:  # ml_dtypes' bfloat16, float8, int4: onnx's own packing
        return onnx.numpy_helper.from_array(arr).raw_data
    arr = arr.astype(dtype.newbyteorder("<"), copy=False)
    return memoryview(arr.reshape(-1)).cast("B")


def set_values(t: onnx.TensorProto, value: np.ndarray) -> None:
    """Make ``value`` the data of ``t``, in ``t``'s dtype, with ``value``'s shape: the one way
    a new value enters a tensor, whether a result's model is built (``complete_model``) or
    its weights written (``weights.WeightState.write``); a streamed save writes the same
    bytes (``raw_bytes``). Every other field (name, doc_string, metadata_props, ...) is
    kept, as the save keeps them."""
    data = bytes(raw_bytes(value, t.data_type))
    for f in DATA_FIELDS:
        t.ClearField(f)
    del t.external_data[:]
    t.ClearField("data_location")
    del t.dims[:]
    t.dims.extend(int(d) for d in np.shape(value))
    t.raw_data = data


def is_mapped(t: onnx.TensorProto) -> bool:
    """Whether ``t`` is one of ``load_model(mapped=True)``'s memory-mapped tensors."""
    return (t.data_location == onnx.TensorProto.EXTERNAL and len(t.external_data) > 0
            and t.external_data[0].key == "location" and t.external_data[0].value == MAPPED)


def mapped_range(t: onnx.TensorProto) -> tuple[str, int, int]:
    """(file, offset, length) of a mapped tensor's bytes."""
    info = _external_info(t)
    return info["path"], int(info["offset"]), int(info["length"])


def tensor_array(t: onnx.TensorProto) -> np.ndarray:
    """A tensor's values: a read-only memory map for a mapped tensor (nothing is read until
    used), else ``numpy_helper.to_array``."""
    if not is_mapped(t):
        return onnx.numpy_helper.to_array(t)
    path, offset, length = mapped_range(t)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")
    shape = tuple(int(d) for d in t.dims)
    try:
        f = _source_file(t)
        with _SOURCES_LOCK:  # (np.memmap seeks the shared file to learn its size)
            return np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape)
    except (OSError, ValueError) as err:
        raise InputError(f"tensor {t.name!r}: cannot map its data in {path} (offset {offset}, "
                         f"{length} bytes): {err}; the file must not change while it is "
                         "used") from err


def materialize(t: onnx.TensorProto) -> None:
    """Read a mapped tensor's bytes into it (a plain tensor again)."""
    if is_mapped(t):
        data = read_mapped(t)
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
        t.raw_data = data


def materialized(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every mapped tensor read in (the model itself if none)."""
    if not any(is_mapped(t) for t in model.graph.initializer):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for t in copy.graph.initializer:
        materialize(t)
    return copy


# Protobuf wire format, as far as finding the main graph's big raw_data fields takes it.
MODEL_GRAPH, GRAPH_INITIALIZER, _GRAPH_INPUT = 7, 5, 11
_T_DIMS, _T_DATA_TYPE, _T_NAME, T_RAW, _T_LOCATION = 1, 2, 8, 9, 14


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _fields(buf, start: int, end: int):
    """(field number, wire type, value start, value end, field start) of each field."""
    pos = start
    while pos < end:
        begin = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, nxt = _varint(buf, pos)
        elif wire == 1:
            nxt = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            nxt = pos + length
        elif wire == 5:
            nxt = pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if nxt > end:
            raise ValueError("truncated message")
        yield number, wire, pos, nxt, begin
        pos = nxt


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def len_header(number: int, length: int) -> bytes:
    """The key and length of a length-delimited protobuf field (its payload follows)."""
    return _encode_varint(number << 3 | 2) + _encode_varint(length)


def _len_field(number: int, payload: bytes) -> bytes:
    return len_header(number, len(payload)) + payload


def _parse_leaving_big_tensors(path: str) -> onnx.ModelProto:
    """Parse the .onnx file at ``path`` without reading the raw_data of its big main-graph
    initializers: the file is memory-mapped, those fields are left out of what protobuf
    parses, and the tensors are marked as mapped onto their place in the file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return onnx.load(path, load_external_data=False)
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _strip_and_parse(buf, size, os.path.realpath(path))
    finally:
        try:
            buf.close()
        except BufferError:  # a view still held by a traceback: the map goes with it
            pass


def _strip_and_parse(buf, size: int, real: str) -> onnx.ModelProto:
    fields = list(_fields(buf, 0, size))
    graphs = [f for f in fields if f[0] == MODEL_GRAPH and f[1] == 2]
    strips: list[tuple[int, ...]] = []  # per big raw_data: its initializer's place, bounds
    if len(graphs) == 1:  # (protobuf would merge several: parse such a file plainly)
        _, _, a, b, _ = graphs[0]
        inputs = set()
        for n2, w2, a2, b2, _ in _fields(buf, a, b):
            if n2 == _GRAPH_INPUT and w2 == 2:
                for n3, w3, a3, b3, _ in _fields(buf, a2, b2):
                    if n3 == 1 and w3 == 2:
                        inputs.add(bytes(buf[a3:b3]))
        k = -1
        for n2, w2, a2, b2, begin2 in _fields(buf, a, b):
            if n2 != GRAPH_INITIALIZER or w2 != 2:
                continue
            k += 1
            raw = name = None
            external = False
            for n3, w3, a3, b3, begin3 in _fields(buf, a2, b2):
                if n3 == T_RAW and w3 == 2:
                    raw = (begin3, a3, b3)
                elif n3 == _T_NAME and w3 == 2:
                    name = bytes(buf[a3:b3])
                elif n3 == _T_LOCATION and w3 == 0 and buf[a3] == 1:
                    external = True
            if raw is not None and not external and raw[2] - raw[1] >= MAP_MIN and \
                    name not in inputs:
                strips.append((k, a2, raw[0], raw[1], raw[2], b2, begin2))
    model = onnx.ModelProto()
    if not strips:  # nothing big to leave out
        model.ParseFromString(bytes(buf[:size]))
        return model
    view = memoryview(buf)
    _, _, a, b, begin = graphs[0]
    graph: list = []  # the graph's bytes, in pieces
    pos = a
    for _, a2, raw_begin, _, raw_end, b2, begin2 in strips:
        graph.append(view[pos:begin2])
        graph.append(_len_field(GRAPH_INITIALIZER, bytes(view[a2:raw_begin]) +
                                bytes(view[raw_end:b2])))
        pos = b2
    graph.append(view[pos:b])
    graph_len = sum(len(piece) for piece in graph)
    head = len_header(MODEL_GRAPH, graph_len)
    model.ParseFromString(b"".join([view[:begin], head, *graph, view[b:size]]))
    del graph, view
    for k, _, _, raw_start, raw_end, _, _ in strips:
        t = model.graph.initializer[k]
        offset, length = raw_start, raw_end - raw_start
        if t.data_type not in _MAPPABLE or tensor_nbytes(t) != length:
            with open(real, "rb") as f:  # read after all: not a kind that is mapped
                f.seek(offset)
                t.raw_data = f.read(length)
            continue
        _mark_mapped(t, real, offset, length)
    return model


_T = onnx.TensorProto
# Where a tensor without raw_data keeps its values, and how many numbers each element takes.
_TYPED_FIELD = {
    _T.FLOAT: ("float_data", 1), _T.COMPLEX64: ("float_data", 2),
    _T.DOUBLE: ("double_data", 1), _T.COMPLEX128: ("double_data", 2),
    _T.INT64: ("int64_data", 1), _T.UINT32: ("uint64_data", 1), _T.UINT64: ("uint64_data", 1),
    **{t: ("int32_data", 1) for t in (_T.INT32, _T.INT16, _T.INT8, _T.UINT16, _T.UINT8,
                                      _T.BOOL, _T.FLOAT16, _T.BFLOAT16)},
}


# Every field that holds a (numeric) tensor's values.
DATA_FIELDS = ("raw_data",) + tuple(dict.fromkeys(f for f, _ in _TYPED_FIELD.values()))


def check_tensor_sizes(model: onnx.ModelProto, source: str) -> None:
    """Refuse a tensor whose stored data does not hold as many elements as its dims say (a
    truncated or corrupt file), naming the tensor and ``source``.

    Raises:
        InputError: The first such tensor.
    """
    for t in _all_tensors(model, subgraphs=True):
        if t.data_location == _T.EXTERNAL or t.data_type not in _TYPED_FIELD:
            continue  # (a mapped tensor's length was checked when it was mapped)
        count = int(np.prod(t.dims, dtype=np.int64))
        if t.HasField("raw_data"):
            want, have, unit = tensor_nbytes(t), len(t.raw_data), "bytes"
        else:
            field_name, per = _TYPED_FIELD[t.data_type]
            want, have, unit = count * per, len(getattr(t, field_name)), "values"
        if have != want:
            raise InputError(f"tensor {t.name!r} in {source} has shape {list(t.dims)} "
                             f"({want} {unit}) but holds {have} {unit}: the file is truncated "
                             "or corrupt")


def _all_tensors(model: onnx.ModelProto, subgraphs: bool = False):
    """The main graph's initializers and Constant values (and, with ``subgraphs``, those of
    every If/Loop/Scan body too)."""
    yield from _graph_tensors(model.graph, subgraphs)


def _graph_tensors(graph: onnx.GraphProto, subgraphs: bool):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif subgraphs and attr.type == onnx.AttributeProto.GRAPH:
                yield from _graph_tensors(attr.g, True)
            elif subgraphs and attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graph_tensors(g, True)


# Types of 4 bits, which a tensor's bytes (and ONNX Runtime) hold two to a byte; ml_dtypes'
# arrays of them take a byte per element.
PACKED_4BIT = frozenset(getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1")
                        if hasattr(onnx.TensorProto, name))


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, from its dims and type (strings count as 0; 4-bit types
    packed, two to a byte)."""
    if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return 0
    count = int(np.prod(t.dims, dtype=np.int64))
    if t.data_type in PACKED_4BIT:
        return (count + 1) // 2
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by the model's tensors, subgraphs included (ByteSize() is not reliable past
    2 GiB)."""
    return sum(tensor_nbytes(t) for t in _all_tensors(model, subgraphs=True))


def all_tensors(model: onnx.ModelProto):
    """Every initializer and Constant value of ``model``, in If/Loop/Scan bodies too."""
    return _all_tensors(model, subgraphs=True)


def external_data_files(path: str | os.PathLike) -> list[str]:
    """Absolute (resolved) paths of the external data files the model file at ``path`` reads,
    subgraphs included; locations that ``load_model`` would refuse are left out."""
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError):
        return []
    base = os.path.dirname(os.path.abspath(os.fspath(path)))
    files = set()
    for t in _all_tensors(model, subgraphs=True):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            try:
                files.add(external_path(t.name, _external_info(t).get("location"), base,
                                        os.fspath(path)))
            except InputError:
                continue
    return sorted(files)


def default_opset(model: onnx.ModelProto) -> int:
    """The model's version of the default ONNX domain."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise InputError("the model does not import the default ONNX domain")
