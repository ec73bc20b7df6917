"""Files in and out: atomic writes, the safetensors reader and writer, progress lines, byte counts.

Every output of the project is written through `atomic_output`: into a temporary name next to the destination
(`.NAME.gemma4-jax-tmp-PID`), renamed into place only when complete, with the mode an ordinary new file or
directory gets (0666/0777 minus the umask). A run that is killed leaves only such a temporary, which the next
run writing the same destination removes. `OSError`s (no space left, read-only file system, permission denied)
become one `Gemma4Error` line naming the path, and nothing partial is left behind.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import ml_dtypes
import numpy as np

from gemma4_jax.errors import Gemma4Error

_TMP_MARK = ".gemma4-jax-tmp-"


# ----- bytes -------------------------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    """2 decimals in the largest binary unit (1 GiB = 2³⁰ B) that keeps the value >= 1, as spec §7 writes them."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ----- errors ------------------------------------------------------------------------------------------------


def os_error(path: str, e: OSError) -> Gemma4Error:
    """An OSError while writing the output `path` as the one line a user sees: which output, and why (e.g. No space
    left on device); the temporary file the kernel named is an implementation detail."""
    reason = e.strerror
    if not reason:  # numpy's tofile reports a short write without the errno: a full disk is the usual cause
        try:
            full = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < (1 << 20)
        except OSError:
            full = False
        reason = f"No space left on device ({e})" if full else str(e)
    return Gemma4Error(f"cannot write {path}: {reason}")


@contextlib.contextmanager
def reading(path: str) -> Iterator[None]:
    """OSErrors while reading `path` become one Gemma4Error line."""
    try:
        yield
    except FileNotFoundError:
        raise Gemma4Error(f"not found: {path}") from None
    except IsADirectoryError:
        raise Gemma4Error(f"{path} is a directory, expected a file") from None
    except OSError as e:
        raise Gemma4Error(f"cannot read {path}: {e.strerror or e}") from None


def read_text(path: str) -> str:
    """A UTF-8 text file; a missing file, a directory, unreadable or non-UTF-8 bytes are one Gemma4Error line."""
    try:
        with reading(path), open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise Gemma4Error(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None


# ----- atomic outputs ----------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(dest: str) -> list[str]:
    """Removes the temporaries of `dest` left by killed runs (their process is gone); returns their paths."""
    removed = []
    pattern = os.path.join(os.path.dirname(dest) or ".", f".{os.path.basename(dest)}{_TMP_MARK}*")
    for tmp in glob.glob(pattern):
        pid = tmp.rsplit(_TMP_MARK, 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else os.remove(tmp)
            removed.append(tmp)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output(dest: str, *, directory: bool = False) -> str:
    """The absolute `dest`, checked before any work: its parent exists, and it does not exist yet (a directory may
    exist if empty; a file output may replace an existing file but not a directory)."""
    dest = os.path.abspath(dest)
    parent = os.path.dirname(dest)
    if not os.path.isdir(parent):
        raise Gemma4Error(f"output directory does not exist: {parent}")
    if directory:
        if os.path.lexists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
            raise Gemma4Error(f"output {dest} exists and is not an empty directory; choose a new path")
    elif os.path.isdir(dest):
        raise Gemma4Error(f"output {dest} is a directory; give a file name")
    if not os.access(parent, os.W_OK):
        raise Gemma4Error(f"cannot write {dest}: permission denied (or read-only file system)")
    return dest


@contextlib.contextmanager
def atomic_output(dest: str, *, directory: bool = False) -> Iterator[str]:
    """Yields a temporary path to write `dest` (a file, or with `directory` a directory created here) into; on
    success it gets the umask's mode and is renamed to `dest`, on any failure it is removed."""
    dest = check_output(dest, directory=directory)
    remove_stale_temporaries(dest)
    tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}{_TMP_MARK}{os.getpid()}")
    try:
        try:
            if directory:
                os.mkdir(tmp)
            yield tmp
            os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
            if directory and os.path.isdir(dest):
                os.rmdir(dest)  # checked empty
            os.replace(tmp, dest)
        except OSError as e:
            raise os_error(dest, e) from None
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)
        raise


def atomic_write(dest: str, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` writes the file; it appears at `dest` only when complete (see `atomic_output`)."""
    with atomic_output(dest) as tmp:
        write(tmp)


def write_text(dest: str, text: str) -> None:
    with atomic_output(dest) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(dest: str, obj) -> None:
    write_text(dest, json.dumps(obj, indent=2) + "\n")


# ----- arrays ------------------------------------------------------------------------------------------------


def aligned_empty(shape, dtype, alignment: int = 64) -> np.ndarray:
    """An uninitialised array whose data is `alignment`-byte aligned: JAX's CPU backend adopts such a buffer as an
    array's memory without copying it (`jax.device_put(x, may_alias=True)`), so loading holds one copy."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = np.empty(nbytes + alignment, np.uint8)
    start = -buffer.ctypes.data % alignment
    return buffer[start : start + nbytes].view(dtype).reshape(shape)


def as_aligned(value: np.ndarray, dtype) -> np.ndarray:
    """`value` as a C-contiguous, 64-byte-aligned array of `dtype`: itself when it already is one, else converted into
    a new aligned buffer in one pass (no intermediate copy)."""
    dtype = np.dtype(dtype)
    if value.dtype == dtype and value.flags.c_contiguous and value.ctypes.data % 64 == 0:
        return value
    out = aligned_empty(value.shape, dtype)
    out[...] = value
    return out


# ----- safetensors -------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
}
_DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
FLOAT_DTYPES = tuple(SAFETENSORS_DTYPES[k] for k in ("BF16", "F16", "F32", "F64"))


class SafetensorsDir:
    """All `*.safetensors` files of a directory (or one file) as one name -> array mapping, read a tensor (or a
    block of rows) at a time with plain file reads: after a tensor has been handed on nothing of the file stays
    resident, so loading peaks near one copy of the weights."""

    def __init__(self, path: str):
        files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise Gemma4Error(f"{path}: no *.safetensors files (expected an HF checkpoint directory)")
        self.path = path
        self._where: dict[str, tuple[str, dict, int]] = {}  # name -> (file, header entry, data start)
        self.metadata: dict[str, str] = {}  # the files' `__metadata__` string maps, merged in file order
        for file in files:
            header, data_start = self._read_header(file)
            for name, entry in header.items():
                if name != "__metadata__":
                    self._where[name] = (file, entry, data_start)
                elif isinstance(entry, dict):
                    self.metadata.update({k: v for k, v in entry.items() if isinstance(v, str)})

    @staticmethod
    def _read_header(file: str) -> tuple[dict, int]:
        try:
            size = os.path.getsize(file)
            with open(file, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if not 2 <= header_len <= size - 8:
                    raise ValueError(f"header length {header_len} does not fit a {size}-byte file")
                header = json.loads(f.read(header_len))
            ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
            raise Gemma4Error(f"{file}: not a readable safetensors file ({e})") from None
        # A truncated file can still have a valid header: check the data size the header promises.
        if size < 8 + header_len + max(ends, default=0):
            raise Gemma4Error(f"{file}: truncated ({size} bytes, header needs {8 + header_len + max(ends)})")
        return header, 8 + header_len

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def dtype(self, name: str) -> np.dtype | None:
        """The stored dtype of tensor `name` (None if absent), from the header alone."""
        if name not in self._where:
            return None
        code = self._where[name][1].get("dtype")
        if code not in SAFETENSORS_DTYPES:
            raise Gemma4Error(f"{self._where[name][0]}: tensor {name} has unsupported dtype {code!r}")
        return SAFETENSORS_DTYPES[code]

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of tensor `name` (None if absent), from the header alone."""
        return tuple(self._where[name][1]["shape"]) if name in self._where else None

    def _locate(self, name: str) -> tuple[str, np.dtype, tuple[int, ...], int]:
        """(file, dtype, shape, absolute offset of the data) of a present tensor, its byte size checked."""
        file, entry, data_start = self._where[name]
        dtype = self.dtype(name)
        try:
            start, end = entry["data_offsets"]
            shape = tuple(int(n) for n in entry["shape"])
        except (KeyError, ValueError, TypeError) as e:
            raise Gemma4Error(f"{file}: cannot read tensor {name} ({e})") from None
        if end - start != math.prod(shape) * dtype.itemsize:
            raise Gemma4Error(f"{file}: cannot read tensor {name} ({end - start} bytes for shape {shape} of {dtype})")
        return file, dtype, shape, data_start + start

    def read(self, name: str) -> np.ndarray | None:
        """Tensor `name` (None if absent)."""
        if name not in self._where:
            return None
        shape = self.shape(name)
        return self.read_rows(name, 0, shape[0] if shape else 1).reshape(shape)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a present tensor (along its first axis), without reading the rest."""
        file, dtype, shape, offset = self._locate(name)
        block = aligned_empty((stop - start, *shape[1:]), dtype)
        with reading(file), open(file, "rb") as f:
            f.seek(offset + start * math.prod(shape[1:]) * dtype.itemsize)
            got = f.readinto(block.reshape(-1).view(np.uint8))
        if got != block.nbytes:
            raise Gemma4Error(f"{file}: truncated while reading {name}")
        return block

    def memmap(self, name: str) -> np.memmap:
        """A read-only memory map of a present tensor, in place in its file (safetensors stores each tensor as a
        plain little-endian C-order array)."""
        file, dtype, shape, offset = self._locate(name)
        return np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape)


class SafetensorsWriter:
    """Writes a safetensors file whose tensors (name, shape, dtype) are known up front, one tensor at a time in that
    order, so a file of any size is written holding one tensor. Use as a context manager; `write` checks each
    tensor against the plan and `close` that every planned tensor was written."""

    def __init__(self, path: str, plan: Iterable[tuple[str, tuple[int, ...], np.dtype]], metadata=None):
        header, offset = {}, 0
        self._plan = [(name, tuple(int(n) for n in shape), np.dtype(dtype)) for name, shape, dtype in plan]
        for name, shape, dtype in self._plan:
            if dtype not in _DTYPE_CODES:
                raise ValueError(f"{name}: dtype {dtype} has no safetensors code")
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = dict(metadata or {"format": "pt"})
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._next = 0
        self._file = open(path, "wb")  # closed in close()
        self._file.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, name: str, array) -> None:
        want = self._plan[self._next] if self._next < len(self._plan) else None
        array = np.asarray(array)
        if want is None or (name, tuple(array.shape), array.dtype) != want:
            raise AssertionError(
                f"safetensors writer out of step: got {name} {array.shape} {array.dtype}, planned {want}"
            )
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)  # no copy of a large tensor
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._plan):
            raise AssertionError(f"{len(self._plan) - self._next} planned tensors were not written")

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is None:
            self.close()
        else:
            self._file.close()


def save_safetensors(path: str, tensors: dict[str, np.ndarray], metadata=None) -> None:
    """A whole dict of arrays as one safetensors file, atomically."""
    arrays = {name: np.asarray(a) for name, a in tensors.items()}
    with atomic_output(path) as tmp:
        with SafetensorsWriter(tmp, [(n, a.shape, a.dtype) for n, a in arrays.items()], metadata) as writer:
            for name, array in arrays.items():
                writer.write(name, array)


# ----- progress ----------------------------------------------------------------------------------------------


class Progress:
    """Progress of a long job on stderr: `what: 42% (4.3 / 10.2 GiB) detail, 12 s, ETA 17 s` — one line updated in
    place on a terminal, else a line every 10 % (or every `every` s). `unit` "bytes" prints sizes, "steps" counts.
    `close(summary)` ends with a one-line summary. Jobs smaller than `min_total` print nothing."""

    def __init__(self, what: str, total: float, *, unit: str = "bytes", stream=None, min_total: float = 0, every=10):
        self.what, self.total, self.done, self.unit = what, max(total, 1), 0.0, unit
        self.stream = stream or sys.stderr
        self.quiet = total < min_total
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = self.last = time.perf_counter()
        self.every = every
        self._last_step = -1

    def _amount(self, n: float) -> str:
        return human_bytes(n) if self.unit == "bytes" else f"{int(n)}"

    def advance(self, n: float = 1, detail: str = "", force: bool = False) -> None:
        self.done += n
        if self.quiet:
            return
        now = time.perf_counter()
        step = int(100 * self.done / self.total) // (1 if self.tty else 10)
        if not force and step == self._last_step and now - self.last < self.every:
            return
        self._last_step, self.last = step, now
        elapsed = now - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        eta_text = "" if math.isnan(eta) or self.done >= self.total else f", ETA {eta:.0f} s"
        amounts = f"{self._amount(self.done)} / {self._amount(self.total)}"
        line = f"{self.what}: {100 * self.done / self.total:3.0f}% ({amounts}){' ' + detail if detail else ''}"
        line += f", {elapsed:.0f} s{eta_text}"
        self.stream.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        self.stream.flush()

    def close(self, summary: str | None = None) -> None:
        if self.tty and not self.quiet:
            self.stream.write("\n")
        if summary:
            self.stream.write(summary + "\n")
        self.stream.flush()


def log(message: str) -> None:
    """A status line on stderr (stdout carries results)."""
    print(message, file=sys.stderr, flush=True)


def sha256_file(path: str) -> str:
    """The hex sha256 of a file's bytes, read in 16 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with reading(path), open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()
