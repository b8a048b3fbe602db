"""Read a PyTorch checkpoint without torch: the legacy (pre-1.6, non-zip) and the zip formats.

Only what a state_dict of float tensors needs: storages become numpy arrays, tensors are views
rebuilt from (storage, offset, size, stride). Used by convert_lite0.py so that regenerating the
shipped model needs numpy + onnx, not a 5 GB torch install.
"""
import collections
import io
import pickle
import struct
import zipfile

import numpy as np

_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name):
        self.name = name
        self.dtype = np.dtype(_DTYPES[name])


class _Storage:
    def __init__(self, dtype, numel):
        self.dtype, self.numel, self.data = dtype, numel, None


class _LazyTensor:
    """A tensor whose storage bytes may not have been read yet (legacy format)."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialise(self):
        return _view(self.storage, self.offset, self.size, self.stride)


def _rebuild_tensor_v2(storage, offset, size, stride, *_args):
    return _LazyTensor(storage, offset, tuple(size), tuple(stride))


def _view(storage, offset, size, stride):
    flat = storage.data
    if len(size) == 0:
        return flat[offset].copy()
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=tuple(size), strides=tuple(s * item for s in stride))
    return np.ascontiguousarray(view)


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, storages, zip_reader=None):
        super().__init__(f)
        self.storages, self.zip_reader = storages, zip_reader

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"unsupported object in checkpoint: {module}.{name}")

    def persistent_load(self, pid):
        typename, storage_type, key, _location, numel = pid[:5]
        assert typename == "storage", pid
        if key not in self.storages:
            st = _Storage(storage_type.dtype, numel)
            if self.zip_reader is not None:
                st.data = np.frombuffer(self.zip_reader(key), dtype=st.dtype)
            self.storages[key] = st
        return self.storages[key]


def load_state_dict(path):
    """Return {name: np.ndarray} from a torch.save()d state_dict (legacy or zip format)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            root = names[0].split("/")[0]
            storages = {}
            obj = _Unpickler(io.BytesIO(z.read(f"{root}/data.pkl")), storages,
                             lambda key: z.read(f"{root}/data/{key}")).load()
    else:
        with open(path, "rb") as f:
            for _ in range(3):  # magic number, protocol version, sys info
                pickle.load(f)
            storages = {}
            obj = _Unpickler(f, storages).load()
            keys = pickle.load(f)
            for key in keys:
                (numel,) = struct.unpack("<q", f.read(8))
                st = storages[key]
                st.data = np.frombuffer(f.read(numel * st.dtype.itemsize), dtype=st.dtype)
    if "state_dict" in obj:
        obj = obj["state_dict"]
    return collections.OrderedDict((k, v.materialise()) for k, v in obj.items())
