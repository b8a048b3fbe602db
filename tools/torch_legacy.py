"""Read and write PyTorch checkpoints without torch (numpy only).

Reading: the legacy (pre-1.6, non-zip) and the zip formats, including whole PyTorch Lightning
checkpoints written by torch 2.x. The unpickler is restricted: it never imports or calls anything from
the file. Tensors are rebuilt from (storage, offset, size, stride) as numpy arrays; a short whitelist of
harmless builtins is honoured; every other class or function the pickle names (Lightning's
AttributeDict, optimizer or callback objects, numpy scalars, ...) becomes an inert `Placeholder` that
only records the arguments it was given.

  load_state_dict(path) -> OrderedDict[str, np.ndarray]        (a bare state_dict, or ckpt["state_dict"])
  load_checkpoint(path) -> (state_dict, hyper_parameters or None)

Writing: `save_checkpoint(path, obj)` writes torch's zip serialization exactly as torch 2.5's
torch.save does: records `<root>/data.pkl` (pickle protocol 2, tensors as
`torch._utils._rebuild_tensor_v2` with persistent ids ('storage', torch.<Type>Storage, key, 'cpu',
numel)), `byteorder`, `data/<key>` (keys in sorted string order), `version` ("3\\n") and
`.data/serialization_id`; every record stored uncompressed, its data 64-byte aligned by an "FB" extra
field of 'Z's, a data descriptor after it, then the central directory and zip64 end records. numpy
arrays (and numpy scalars) in `obj` become tensors; dicts, OrderedDicts, lists, tuples, str, int,
float, bool and None pass through. Checked against torch 2.5.1 with tools/check_export_timm.py.
"""
import collections
import io
import os
import pickle
import struct
import sys
import zipfile
import zlib

import numpy as np

_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "BFloat16Storage": np.uint16,  # raw bits; widened to float32 in _view
}


class _StorageType:
    def __init__(self, name):
        self.name = name
        self.dtype = np.dtype(_DTYPES[name])


class _Storage:
    def __init__(self, storage_type, numel):
        self.type, self.dtype, self.numel, self.data = storage_type, storage_type.dtype, numel, None
        self.load = None  # zip format: reads the bytes on first use


class _LazyTensor:
    """A tensor whose storage bytes may not have been read yet."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialise(self):
        return _view(self.storage, self.offset, self.size, self.stride)

    def __repr__(self):
        return f"<tensor {self.storage.type.name} {self.size}>"


class Placeholder(dict):
    """Stands in for any class or function the checkpoint names that is not whitelisted.

    Never executes anything: it records constructor/call arguments, pickled state, dict items
    (Lightning's AttributeDict is a dict subclass) and list items, and nothing else.
    """
    qualname = "?"

    def __new__(cls, *args, **kwargs):
        self = dict.__new__(cls)
        self.args, self.kwargs, self.state, self.items_list = args, kwargs, None, []
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def append(self, item):
        self.items_list.append(item)

    def extend(self, items):
        self.items_list.extend(items)

    def __repr__(self):
        return f"<placeholder {self.qualname} args={self.args!r} items={dict(self)!r}>"


def _placeholder(module, name):
    return type("Placeholder", (Placeholder,), {"qualname": f"{module}.{name}"})


def _rebuild_tensor_v2(storage, offset, size, stride, *_args):
    return _LazyTensor(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *_args):
    return data


def _codecs_encode(text, encoding="utf-8", *_args):
    # protocol 2 pickles bytes as _codecs.encode(str, "latin1")
    return str(text).encode(encoding)


_SAFE = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("__builtin__", "set"): set,
    ("builtins", "complex"): complex, ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): _codecs_encode,
}


def _view(storage, offset, size, stride):
    if storage.data is None:
        if storage.load is None:
            raise ValueError("tensor storage bytes missing from checkpoint")
        storage.data = storage.load()
    flat = storage.data
    if len(size) == 0:
        out = np.array(flat[offset])
    else:
        item = flat.dtype.itemsize
        need = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else offset
        if need > flat.size:
            raise ValueError(f"tensor view {size}/{stride}+{offset} exceeds its storage of {flat.size}")
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=tuple(size), strides=tuple(s * item for s in stride))
        out = np.ascontiguousarray(view)
    if storage.type.name == "BFloat16Storage":
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, storages, zip_reader=None):
        super().__init__(f)
        self.storages, self.zip_reader = storages, zip_reader

    def find_class(self, module, name):
        if (module, name) in _SAFE:
            return _SAFE[(module, name)]
        if module == "torch" and name in _DTYPES:
            return _StorageType(name)
        return _placeholder(module, name)

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id in checkpoint: {pid!r}")
        _typename, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type in checkpoint: {storage_type!r}")
        key = str(key)
        if key not in self.storages:
            st = _Storage(storage_type, numel)
            if self.zip_reader is not None:
                reader = self.zip_reader
                st.load = lambda key=key, st=st: _frombuffer(reader(key), st)
            self.storages[key] = st
        return self.storages[key]


def _frombuffer(raw, st):
    data = np.frombuffer(raw, dtype=st.dtype)
    if data.size < st.numel:
        raise ValueError(f"storage holds {data.size} elements, expected {st.numel}")
    return data


def _load(path):
    """Unpickle the whole checkpoint object; tensors stay lazy (_LazyTensor)."""
    if zipfile.is_zipfile(path):
        z = zipfile.ZipFile(path)
        names = z.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise ValueError(f"{path}: a zip file without data.pkl is not a torch checkpoint")
        root = pkl[0][: -len("data.pkl")]
        obj = _Unpickler(io.BytesIO(z.read(pkl[0])), {}, lambda key: z.read(f"{root}data/{key}")).load()
        return obj
    with open(path, "rb") as f:
        for _ in range(3):  # magic number, protocol version, sys info
            pickle.load(f)
        storages = {}
        obj = _Unpickler(f, storages).load()
        keys = pickle.load(f)
        for key in keys:
            (numel,) = struct.unpack("<q", f.read(8))
            st = storages[str(key)]
            st.data = np.frombuffer(f.read(numel * st.dtype.itemsize), dtype=st.dtype)
    return obj


def _plain(obj):
    """Placeholders and containers -> plain python (for hyper_parameters)."""
    if isinstance(obj, _LazyTensor):
        return obj.materialise()
    if isinstance(obj, Placeholder) and not len(obj):
        return f"<{obj.qualname}{_plain(obj.args)!r}>"
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _state_dict(obj, path):
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: no state_dict found (top-level object is {type(obj).__name__})")
    out = collections.OrderedDict()
    for k, v in sd.items():
        if not isinstance(v, _LazyTensor):
            raise ValueError(f"{path}: state_dict entry {k!r} is not a tensor ({v!r:.80})")
        out[str(k)] = v.materialise()
    return out


def load_state_dict(path):
    """Return {name: np.ndarray} from a torch.save()d state_dict or checkpoint (legacy or zip format)."""
    return _state_dict(_load(path), path)


def load_checkpoint(path):
    """Return (state_dict, hyper_parameters) of a (Lightning) checkpoint; hyper_parameters may be None."""
    obj = _load(path)
    hp = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    return _state_dict(obj, path), (_plain(hp) if isinstance(hp, dict) else None)


# ---------------------------------------------------------------- writer

_STORAGE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items() if k != "BFloat16Storage"}


class _Global:
    """A class/function reference written as a pickle GLOBAL without importing it."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *_args):  # pickle's save_reduce insists on a callable
        raise TypeError(f"{self.module}.{self.name} is a reference, not a function")


_REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")
_STORAGE_GLOBALS = {}


class _TensorOut:
    def __init__(self, array, key):
        self.array, self.key = array, key


class _Pickler(pickle._Pickler):
    """Pure-python pickler (protocol 2) that writes torch's tensor encoding."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, f):
        super().__init__(f, protocol=2)
        self.storage_keys = {}  # id(array) -> key
        self.storages = []      # (key, contiguous array)

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", obj.type, obj.key, "cpu", obj.numel)
        return None

    def save_global_ref(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
        self.memoize(obj)

    dispatch[_Global] = save_global_ref

    def save_tensor(self, obj):
        arr = obj.array
        st = _StorageRef(arr, self)
        size = tuple(int(n) for n in arr.shape)
        stride = tuple(int(s) // arr.itemsize for s in arr.strides) if arr.ndim else ()
        self.save_reduce(_REBUILD, (st, 0, size, stride, False, collections.OrderedDict()), obj=obj)

    dispatch[_TensorOut] = save_tensor


class _StorageRef:
    def __init__(self, arr, pickler):
        name = _STORAGE_NAMES[arr.dtype]
        self.type = _STORAGE_GLOBALS.setdefault(name, _Global("torch", name))
        self.key = str(len(pickler.storages))
        self.numel = int(arr.size)
        pickler.storages.append((self.key, arr))


def _to_tensors(obj):
    if isinstance(obj, np.ndarray) or isinstance(obj, np.generic):
        arr = np.array(obj, order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if arr.dtype not in _STORAGE_NAMES:
            raise TypeError(f"cannot save a numpy array of dtype {arr.dtype} as a torch tensor")
        return _TensorOut(arr, None)
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _to_tensors(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _to_tensors(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_tensors(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_tensors(v) for v in obj)
    if obj is None or isinstance(obj, (str, int, float, bool, bytes)):
        return obj
    raise TypeError(f"cannot save an object of type {type(obj).__name__} in a checkpoint")


class _ZipWriter:
    """The record layout of torch's PyTorchStreamWriter (caffe2/serialize/inline_container.cc)."""

    ALIGN = 64

    def __init__(self, f, root):
        self.f, self.root, self.pos, self.central = f, root, 0, []

    def write_record(self, name, data):
        data = bytes(data)
        fname = f"{self.root}/{name}".encode("utf-8")
        if len(data) >= 0xFFFFFFFF or self.pos >= 0xFFFFFFFF:
            raise ValueError("records or archives over 4 GiB are not supported by this writer")
        start = self.pos + 30 + len(fname) + 4
        pad = (-start) % self.ALIGN
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        crc = zlib.crc32(data) & 0xFFFFFFFF
        header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, 0x0808, 0, 0, 0, 0, 0, 0, len(fname), len(extra))
        offset = self.pos
        self._w(header + fname + extra)
        self._w(data)
        self._w(struct.pack("<IIII", 0x08074B50, crc, len(data), len(data)))
        self.central.append((fname, crc, len(data), offset))

    def _w(self, b):
        self.f.write(b)
        self.pos += len(b)

    def finish(self):
        cd_start = self.pos
        for fname, crc, size, offset in self.central:
            self._w(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0, 0x0808, 0, 0, 0, crc, size, size,
                                len(fname), 0, 0, 0, 0, 0, offset) + fname)
        cd_size = self.pos - cd_start
        z64 = self.pos
        n = len(self.central)
        self._w(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x2D, 0, 0, n, n, cd_size, cd_start))
        self._w(struct.pack("<IIQI", 0x07064B50, 0, z64, 1))
        self._w(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, cd_size, cd_start, 0))


def save_checkpoint(path, obj, serialization_id=None):
    """Write `obj` (numpy arrays become tensors) in torch 2.5's torch.save zip format.

    The archive's root folder is the file name up to its first dot, as torch names it.
    `serialization_id` (torch: random) defaults to a value derived from the pickle, so that the same
    object always gives the same bytes.
    """
    buf = io.BytesIO()
    pickler = _Pickler(buf)
    pickler.dump(_to_tensors(obj))
    pkl = buf.getvalue()
    root = os.path.basename(path).split(".")[0] or "archive"
    if serialization_id is None:
        h = zlib.crc32(pkl)
        for _key, arr in pickler.storages:
            h = zlib.crc32(arr.reshape(-1).view(np.uint8)[: 1 << 16], h)
        serialization_id = f"{h:040d}"
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        z = _ZipWriter(f, root)
        z.write_record("data.pkl", pkl)
        z.write_record("byteorder", sys.byteorder.encode())
        for key, arr in sorted(pickler.storages, key=lambda kv: kv[0]):
            z.write_record(f"data/{key}", arr.reshape(-1).view(np.uint8).data)
        z.write_record("version", b"3\n")
        z.write_record(".data/serialization_id", serialization_id.encode())
        z.finish()
    os.replace(tmp, path)
