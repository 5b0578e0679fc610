"""Static scanning of pickle streams: parses opcodes, never executes them.

A pickle can only run code by importing a global (``GLOBAL``, ``STACK_GLOBAL``, ``INST``, or the
copyreg extension registry ``EXT1/2/4``) and calling it (``REDUCE``, ``NEWOBJ``, ``NEWOBJ_EX``,
``OBJ``, ``INST``) or by handing state to an object's ``__setstate__`` (``BUILD``). The scanner runs
the pickle machine symbolically over :func:`pickletools.genops`: it keeps a stack and a memo of
*descriptions* of values (a literal string, a global reference, an object made by a known
callable, a mark, or "something else"), so it knows exactly which global each ``STACK_GLOBAL``
names, even when the module and name strings were memoized earlier and fetched back with
``BINGET``, and exactly which callable each ``REDUCE``/``NEWOBJ``/``BUILD`` applies to.

It fails closed: a global outside the allowlist, a call on anything that is not an allowlisted
global, a ``STACK_GLOBAL`` whose operands are not literal strings, the extension registry, or a
stream the parser cannot follow is a finding, and any finding refuses the file.

The allowlist is what ``torch.jit.save`` writes (checked against ``pickler.cpp`` and the globals
``unpickler.cpp`` accepts, and against real archives of several module kinds); see
:data:`CALLABLE_GLOBALS`, :data:`VALUE_GLOBALS` and :func:`classify_global`.
"""

from __future__ import annotations

import io
import pickletools
import re
from dataclasses import dataclass, field
from typing import IO, Any

# -- the allowlist --------------------------------------------------------------------------------

#: Globals that torch.jit.save's pickler applies REDUCE to, and what each is for.
CALLABLE_GLOBALS: dict[tuple[str, str], str] = {
    ("torch._utils", "_rebuild_tensor_v2"): "rebuilds every tensor attribute/parameter/buffer",
    ("torch._utils", "_rebuild_qtensor"): "rebuilds quantized tensors (quantized modules)",
    ("torch._utils", "_rebuild_sparse_tensor"): "rebuilds sparse COO/CSR tensor attributes",
    ("torch.jit._pickle", "restore_type_tag"): "re-attaches the static type of List/Dict attrs",
    ("torch.jit._pickle", "build_intlist"): "typed List[int] (sizes/strides inside tensors)",
    ("torch.jit._pickle", "build_doublelist"): "typed List[float] attributes (legacy tag)",
    ("torch.jit._pickle", "build_boollist"): "typed List[bool] attributes (legacy tag)",
    ("torch.jit._pickle", "build_tensorlist"): "typed List[Tensor] attributes (legacy tag)",
    ("torch.jit._pickle", "build_tensor_from_id"): "tensor-table reference (legacy/RPC form)",
    ("collections", "OrderedDict"): "the (empty) backward-hooks dict written with each tensor",
    ("builtins", "complex"): "complex-number attributes",
    ("torch", "device"): "torch.device attributes",
}

#: The quantization schemes torch.jit.save writes as bare globals inside quantized tensors.
QSCHEMES = frozenset(
    {
        "per_tensor_affine",
        "per_channel_affine",
        "per_tensor_symmetric",
        "per_channel_symmetric",
        "per_channel_affine_float_qparams",
    }
)

#: Globals that may appear only as values (never called): ``torch.<ScalarType>Storage`` names the
#: dtype of each storage inside the BINPERSID tuple, and a qscheme names how a qtensor is quantized.
VALUE_GLOBALS_DOC = {
    "torch.<ScalarType>Storage": "dtype tag of each storage record (FloatStorage, HalfStorage...)",
    "torch.<qscheme>": "quantization scheme of a quantized tensor (per_tensor_affine, ...)",
}

#: TorchBind (C++) classes that stock torch registers and stock modules save: ``quantized.*``
#: (LinearPackedParamsBase, Conv2dPackedParamsBase, ... of quantized Linear/Conv) and ``rnn.*``
#: (CellParamsBase of dynamically quantized LSTM/GRU). Any other ``__torch__.torch.classes.<ns>``
#: needs a C++ extension the workers do not load, or is ``tensorrt.Engine`` (a Torch-TensorRT
#: module, which carries a whole engine): refused.
TORCHBIND_NAMESPACES = frozenset({"quantized", "rnn"})

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_STORAGE = re.compile(r"[A-Z][A-Za-z0-9_]*Storage\Z")
_QUALIFIED = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\.[A-Za-z_][A-Za-z0-9_]*\Z")
_TORCHSCRIPT_MODULE = re.compile(r"__torch__(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")

# Modules whose globals are the classic payloads; only used to word messages, never to allow.
_DANGEROUS_ROOTS = frozenset(
    {
        "os",
        "posix",
        "nt",
        "subprocess",
        "builtins",
        "__builtin__",
        "sys",
        "socket",
        "shutil",
        "runpy",
        "importlib",
        "pty",
        "ctypes",
        "pickle",
        "_pickle",
        "marshal",
        "types",
        "code",
        "codeop",
        "operator",
        "functools",
        "webbrowser",
        "asyncio",
        "multiprocessing",
        "signal",
        "platform",
        "commands",
        "tempfile",
        "pathlib",
        "io",
        "_io",
        "glob",
        "urllib",
        "http",
        "requests",
        "ftplib",
        "smtplib",
        "telnetlib",
        "pdb",
        "bdb",
        "timeit",
        "cProfile",
        "profile",
        "trace",
        "pip",
        "setuptools",
        "distutils",
        "dill",
        "joblib",
    }
)
# ... and entry points inside torch/numpy that load files, code or native libraries.
_DANGEROUS_PREFIXES = (
    "torch.load", "torch.serialization", "torch.hub", "torch.jit.load", "torch.package",
    "torch.utils.cpp_extension", "torch.ops", "torch._C", "torch.classes", "torch._dynamo",
    "torch._inductor", "torch.distributed", "numpy.load", "numpy.testing", "numpy.f2py",
    "numpy.distutils", "numpy.ctypeslib",
)  # fmt: skip

# Opcodes whose string argument pushes a str that STACK_GLOBAL can consume (the STRING family
# decodes to str under Python 3's default encoding="ASCII", so it counts too).
_STR_OPS = frozenset(
    {
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "BINUNICODE8",
        "UNICODE",
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
    }
)
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_KEEP_CONTAINER_OPS = {"APPEND": 1, "SETITEM": 2}  # items popped above the container
_KEEP_CONTAINER_MARK_OPS = frozenset({"APPENDS", "SETITEMS", "ADDITEMS"})
_MAX_STR = 512  # longer literals are tracked as "too long" (no real module/qualname is)


def classify_global(module: str, name: str) -> str | None:
    """How an allowlisted global may be used: "callable", "value", "class"; None when refused.

    ``name`` must be a plain identifier: protocol 4 resolves dotted names with getattr chains
    (``torch`` + ``FloatStorage.__init__.__globals__...``), so a dotted name is never allowed.
    """
    if not _IDENT.match(name):
        return None
    if (module, name) in CALLABLE_GLOBALS:
        return "callable"
    if module == "torch" and (_STORAGE.match(name) or name in QSCHEMES):
        return "value"
    if _TORCHSCRIPT_MODULE.match(module):
        # TorchScript classes are resolved by the loader against the archive's own compiled code,
        # never imported as Python; TorchBind classes are C++ classes registered with torch.
        if module.startswith("__torch__.torch.classes"):
            parts = module.split(".")
            if len(parts) != 4 or parts[3] not in TORCHBIND_NAMESPACES:
                return None
        return "class"
    return None


def looks_dangerous(qualified: str) -> bool:
    """True for globals from modules used by classic pickle payloads (wording only)."""
    root = qualified.split(".", 1)[0]
    return root in _DANGEROUS_ROOTS or qualified.startswith(_DANGEROUS_PREFIXES)


# -- the symbolic machine ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Val:
    kind: str  # "str", "global", "obj", "mark", "other"
    text: str | None = None  # str: the literal (None when too long); global/obj: "module.name"
    role: str | None = None  # global: classify_global's answer; obj: role of its maker


_MARK = _Val("mark")
_OTHER = _Val("other")


@dataclass
class PickleScan:
    """What :func:`scan_pickle` found in one stream (possibly several pickles back to back)."""

    globals: list[str] = field(default_factory=list)  # every global referenced, "mod.name"
    refused: list[str] = field(default_factory=list)  # globals outside the allowlist
    problems: list[str] = field(default_factory=list)  # other findings (calls, malformed stream)
    protocols: list[int] = field(default_factory=list)
    pickles: int = 0  # complete pickles (each ending in STOP)
    opcodes: int = 0
    malformed: bool = False  # the parser could not follow the stream
    exhausted: bool = False  # stopped at max_opcodes (bounds the CPU a crafted stream can cost)

    @property
    def ok(self) -> bool:
        return not self.refused and not self.problems

    @property
    def is_pickle(self) -> bool:
        """The bytes are a pickle: one parsed to STOP, or the scan stopped at a named global."""
        if self.pickles > 0 or (self.exhausted and not self.malformed):
            return True
        return not self.malformed and any(_QUALIFIED.match(g) for g in self.refused)

    def first_reason(self) -> str:
        if self.refused:
            dangerous = [g for g in self.refused if looks_dangerous(g)]
            return f"references {(dangerous or self.refused)[0]}"
        return self.problems[0] if self.problems else ""


class _Bounded:
    """A reader that never asks the underlying stream for more than what is left.

    ``pickletools`` reads a length-prefixed argument with ``f.read(n)``; a buffered file object
    allocates ``n`` bytes before reading, so a forged 2**60 length would be a memory bomb. Reads
    are capped at what is left of ``limit`` and done in 1 MiB chunks.
    """

    def __init__(self, raw: IO[bytes], limit: int) -> None:
        self._raw = raw
        self._left = limit  # bytes the consumer may still get, lookahead included
        self._peek = b""
        self._pos = 0

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0 or n > self._left:
            n = self._left
        parts = [self._peek[:n]]
        self._peek = self._peek[n:]
        got = len(parts[0])
        while got < n:
            chunk = self._raw.read(min(n - got, 1 << 20))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        self._left -= got
        self._pos += got
        return b"".join(parts)

    def readline(self, size: int | None = -1) -> bytes:
        cap = self._left if size is None or size < 0 else min(size, self._left)
        buf = bytearray()
        while len(buf) < cap:
            c = self.read(1)
            if not c:
                break
            buf += c
            if c == b"\n":
                break
        return bytes(buf)

    def tell(self) -> int:
        return self._pos

    def at_eof(self) -> bool:
        if self._left <= 0:
            return True
        if not self._peek:
            self._peek = self._raw.read(1)
        return not self._peek


class _Refuse(Exception):
    pass


def scan_pickle(
    stream: IO[bytes], limit: int, *, max_pickles: int = 64, max_opcodes: int = 4_000_000
) -> PickleScan:
    """Scan the pickle(s) in ``stream`` (at most ``limit`` bytes), executing nothing.

    Several pickles back to back (the legacy ``torch.save`` layout) are scanned one after the
    other, up to ``max_pickles``. At most ``max_opcodes`` opcodes are followed (about 0.7 M/s;
    a real data.pkl has ~30 per tensor), after which the stream counts as a finding. Never
    raises for bad input: problems are reported in the result.
    """
    result = PickleScan()
    reader = _Bounded(stream, limit)
    while result.pickles < max_pickles:
        try:
            _scan_one(reader, result, max_opcodes)
        except _Refuse:
            return result
        except Exception as exc:  # pickletools raises ValueError & co. on garbage
            result.malformed = True
            result.problems.append(f"malformed pickle stream ({_short(exc)})")
            return result
        if reader.at_eof():
            return result
    result.problems.append(f"more than {max_pickles} pickles in one stream")
    return result


def scan_pickle_bytes(data: bytes) -> PickleScan:
    return scan_pickle(io.BytesIO(data), len(data))


def _int(arg: object) -> int:
    if not isinstance(arg, int):
        raise ValueError(f"expected an integer argument, got {arg!r:.40}")
    return arg


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _scan_one(reader: _Bounded, result: PickleScan, max_opcodes: int) -> None:
    stack: list[_Val] = []
    memo: dict[int, _Val] = {}

    def pop() -> _Val:
        # Python's machine keeps marks on a separate metastack, so an item pop never crosses a
        # MARK (it raises); fail the same way rather than guess.
        if not stack or stack[-1] is _MARK:
            raise ValueError("stack underflow")
        return stack.pop()

    def pop_to_mark() -> list[_Val]:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                items = stack[i + 1 :]
                del stack[i:]
                return items
        raise ValueError("no MARK on the stack")

    def top() -> _Val:
        if not stack or stack[-1] is _MARK:
            raise ValueError("memo/BUILD on an empty stack")
        return stack[-1]

    def add_global(module: str, name: str) -> _Val:
        qualified = f"{module}.{name}"
        role = classify_global(module, name)
        result.globals.append(qualified)
        if role is None:
            result.refused.append(qualified)
            raise _Refuse
        return _Val("global", qualified, role)

    def call(fn: _Val, opname: str) -> _Val:
        if fn.kind != "global":
            result.problems.append(f"{opname} applied to a value that is not a named global")
            raise _Refuse
        if fn.role not in ("callable", "class"):
            result.problems.append(f"{opname} calls {fn.text}, which torch files never call")
            raise _Refuse
        return _Val("obj", fn.text, fn.role)

    ops: Any = pickletools.genops(reader)  # type: ignore[arg-type]  # duck-typed reader
    for opcode, arg, _pos in ops:
        result.opcodes += 1
        if result.opcodes > max_opcodes:
            result.exhausted = True
            result.problems.append(f"more than {max_opcodes} opcodes (too large to scan)")
            raise _Refuse
        name = opcode.name
        if name == "PROTO":
            result.protocols.append(_int(arg))
        elif name in ("FRAME", "STOP"):
            if name == "STOP":
                result.pickles += 1
                return
        elif name == "MARK":
            stack.append(_MARK)
        elif name == "POP":
            if not stack:
                raise ValueError("POP on an empty stack")
            stack.pop()  # on a MARK this drops the mark, as Python's POP does
        elif name == "POP_MARK":
            pop_to_mark()
        elif name == "DUP":
            stack.append(top())
        elif name in _STR_OPS:
            text = arg if isinstance(arg, str) and len(arg) <= _MAX_STR else None
            stack.append(_Val("str", text))
        elif name in _PUT_OPS:
            memo[_int(arg)] = top()
        elif name == "MEMOIZE":
            memo[len(memo)] = top()
        elif name in _GET_OPS:
            if _int(arg) not in memo:
                raise ValueError(f"memo key {arg} read before it was written")
            stack.append(memo[_int(arg)])
        elif name == "GLOBAL":
            parts = str(arg).split(" ")
            if len(parts) != 2:
                result.problems.append(f"GLOBAL with an ambiguous name {str(arg)[:80]!r}")
                raise _Refuse
            stack.append(add_global(parts[0], parts[1]))
        elif name == "STACK_GLOBAL":
            qual, mod = pop(), pop()
            if mod.kind != "str" or qual.kind != "str" or mod.text is None or qual.text is None:
                result.problems.append("STACK_GLOBAL on operands that are not literal strings")
                raise _Refuse
            stack.append(add_global(mod.text, qual.text))
        elif name == "INST":
            parts = str(arg).split(" ")
            if len(parts) != 2:
                result.problems.append(f"INST with an ambiguous name {str(arg)[:80]!r}")
                raise _Refuse
            fn = add_global(parts[0], parts[1])
            pop_to_mark()
            stack.append(call(fn, "INST"))
        elif name == "OBJ":
            items = pop_to_mark()
            if not items:
                raise ValueError("OBJ without a class")
            stack.append(call(items[0], "OBJ"))
        elif name == "REDUCE":
            pop()
            stack.append(call(pop(), "REDUCE"))
        elif name == "NEWOBJ":
            pop()
            stack.append(call(pop(), "NEWOBJ"))
        elif name == "NEWOBJ_EX":
            pop()
            pop()
            stack.append(call(pop(), "NEWOBJ_EX"))
        elif name == "BUILD":
            pop()
            target = top()
            if target.kind != "obj" or target.role not in ("callable", "class"):
                result.problems.append("BUILD (__setstate__) on an object of unknown origin")
                raise _Refuse
        elif name in ("EXT1", "EXT2", "EXT4"):
            result.problems.append(f"{name} (copyreg extension registry) can name any global")
            raise _Refuse
        elif name in _KEEP_CONTAINER_OPS:
            for _ in range(_KEEP_CONTAINER_OPS[name]):
                pop()
            top()
        elif name in _KEEP_CONTAINER_MARK_OPS:
            pop_to_mark()
            top()
        else:
            _generic(opcode, stack, pop, pop_to_mark)
    raise ValueError("pickle ended without STOP")


def _generic(opcode: Any, stack: list[_Val], pop: Any, pop_to_mark: Any) -> None:
    """Stack effect from pickletools' own opcode table, for the opcodes that only build data."""
    before = opcode.stack_before
    if any(s is pickletools.markobject for s in before):
        pop_to_mark()
        below = [s for s in before if s is pickletools.markobject]
        for _ in range(before.index(below[0])):
            pop()
    else:
        for _ in before:
            pop()
    stack.extend(_OTHER for _ in opcode.stack_after)
