"""Low-overhead launches of ``@triton.jit`` kernels.

``kernel[grid](*args, **kwargs)`` spends most of its host time (~17 us on the H100 machine,
triton 3.6) before the driver call: binding the arguments, computing the specialization and a
string cache key, building launch metadata for the profiler hooks and calling the (empty) hook
chains. :func:`launch` does the same launch with less host work:

* the first call for a given *specialization key* goes through the plain ``kernel[grid](...)``
  (which compiles if needed and returns the ``CompiledKernel``);
* later calls with the same key call the compiled kernel's launcher directly
  (``CompiledKernel.run``, the entry point ``JITFunction.run`` itself ends in; on triton 3.6 its
  C ``launch`` function when the kernel needs no scratch memory) with cached handles, no launch
  metadata, tensors passed as raw device pointers.

The key captures everything Triton specializes on: the current device, every keyword argument
(constexprs and options such as ``num_warps`` / ``num_stages``), every positional constexpr's
value, each tensor's dtype, address modulo 16 and CUDA-ness, and for each integer whether it is 1,
whether it is divisible by 16 and its Triton type (i32 / i64 / u64), plus the process-wide Triton
debug / instrumentation knobs. It is at least as fine as Triton's own key, so a cached launch runs
the very kernel the plain launch would run. ``do_not_specialize`` is honoured only for ints that
also carry a type annotation (``n: tl.int32``: Triton then keys on the annotation alone, and so do
we, skipping the per-call value checks); for other parameters it only costs extra cache entries.

Falls back to the plain launch, with identical results, under ``TRITON_INTERPRET=1``, for
objects that are not ``JITFunction`` (autotuners, interpreted functions), for callable grids,
arguments of other types (numpy scalars, tensor descriptors), runtime (non-constexpr) parameters
passed by keyword, when launch hooks or pre-run hooks are installed, and - checked at first use,
with one warning - whenever the installed Triton's internals are not what this module expects.
Every call reads the current CUDA stream, so launches are capturable in CUDA graphs.

Usage::

    from attnplug.core._launch import fast_launcher, launch

    # instead of: _my_kernel[grid](x, y, n, BLOCK=128, num_warps=4)
    launch(_my_kernel, grid, x, y, n, BLOCK=128, num_warps=4)

    # per-layer / per-step hot paths: bind once at import, skip the lookup by kernel
    _LAUNCH_MY_KERNEL = fast_launcher(_my_kernel)
    _LAUNCH_MY_KERNEL(grid, x, y, n, 128, num_warps=4)  # constexprs may go positionally

Pass runtime arguments positionally; constexprs positionally (cheapest) or by keyword; launch
options (``num_warps``, ``num_stages``, ...) by keyword. ``grid`` is a tuple of 1 to 3 ints (a
callable grid takes the plain launch). Nothing is returned.

Keyed launches: a per-step op that validates its inputs anyway can skip the generic key as well,
through ``FastLauncher.launch_by_key(key, grid, call_args, args)``, when its kernel leaves Triton
nothing to specialize on but what the op's own key holds: every int parameter annotated and in
``do_not_specialize``, every pointer in ``do_not_specialize_on_alignment``. Triton then keys on
the pointers' dtypes (and None-ness), the constexprs and the options only
(``attnplug.core.decode_metadata`` is the example).
"""

from __future__ import annotations

import os
import warnings

import torch
import triton

_TENSOR = torch.Tensor
# Triton versions whose CudaLauncher.__call__ / C launch signature were read (see _launch_entry).
_DIRECT_C_LAUNCH_VERSIONS = ("3.6.",)


_BY_KEY = object()  # marks keys made by launch_by_key's callers, apart from the packer's


class _Unsupported(Exception):
    """An argument the fast path does not handle; the call takes the plain launch."""


def _int_code(value: int) -> int:
    """Key code of an int that is 1 or outside the i32 range (codes 2..6; i32 ints get False / True:
    divisible by 16 or not)."""
    if value == 1:
        return 2
    return (3 if value <= 9223372036854775807 else 5) + (not value & 15)


def _other_arg_key(arg):
    """(kind, code, value passed to the launcher) for arguments that are not exact Tensor / int."""
    cls = arg.__class__
    if isinstance(arg, _TENSOR):  # a subclass such as nn.Parameter
        ptr = arg.data_ptr()
        return arg.dtype, ptr & 15 if arg.is_cuda else (ptr & 15) - 16, ptr
    if cls is bool or cls is float:  # Triton does not specialize on their values
        return cls, 0, arg
    if arg is None:
        return None, 0, None
    raise _Unsupported(cls)


_INT_TYPES = ("i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64")


def _unspecialized_int(param) -> bool:
    """An int parameter Triton does not specialize at all: in ``do_not_specialize`` and annotated with
    its type (e.g. ``n: tl.int32``), so Triton's key holds ``("i32", None)`` whatever the value."""
    return bool(getattr(param, "do_not_specialize", False)) and getattr(param, "annotation_type", "") in _INT_TYPES


def _make_arg_packer(params, num_positional: int):
    """Generate ``pack(device, kw, a0, a1, ...) -> (key, launcher_args)`` for ``num_positional`` args.

    Unrolled per parameter (like Triton's own binder) because this runs on every launch.
    Per runtime parameter the key gets two flat entries: (dtype, address % 16, minus 16 off the GPU)
    for a tensor, (int, code) for an int: whether an i32 is divisible by 16, or :func:`_int_code`.
    An int Triton does not specialize (:func:`_unspecialized_int`) adds nothing but a type check.
    """
    names = [f"a{i}" for i in range(num_positional)]
    lines = [f"def pack(device, kw, {', '.join(names)}):" if names else "def pack(device, kw):"]
    key_parts, call_parts = ["device", "kw"], []
    for i, (name, param) in enumerate(zip(names, params)):
        if param.is_constexpr:
            key_parts.append(name)
            call_parts.append(name)
            continue
        if _unspecialized_int(param):  # Triton's key holds only the annotated type: nothing to add
            lines += [f"    if {name}.__class__ is not int:", "        raise _Unsupported(type(" + name + "))"]
            call_parts.append(name)
            continue
        lines += [
            f"    if {name}.__class__ is _TENSOR:",
            f"        p{i} = {name}.data_ptr()",
            f"        k{i} = {name}.dtype",
            f"        c{i} = p{i} & 15 if {name}.is_cuda else (p{i} & 15) - 16",
            f"    elif {name}.__class__ is int:",
            f"        p{i} = {name}",
            f"        k{i} = int",
            f"        c{i} = not {name} & 15 if -2147483648 <= {name} <= 2147483647 and {name} != 1 else _int_code({name})",
            "    else:",
            f"        k{i}, c{i}, p{i} = _other_arg_key({name})",
        ]
        key_parts += [f"k{i}", f"c{i}"]
        call_parts.append(f"p{i}")
    lines.append(f"    return ({', '.join(key_parts)},), ({''.join(p + ', ' for p in call_parts)})")
    namespace = {"_TENSOR": _TENSOR, "_other_arg_key": _other_arg_key, "_int_code": _int_code,
                 "_Unsupported": _Unsupported}
    exec("\n".join(lines), namespace)  # noqa: S102 - generated from parameter indices only
    return namespace["pack"]


class FastLauncher:
    """Launches one ``@triton.jit`` kernel through cached compiled-kernel handles.

    Parameters
    ----------
    kernel : triton.runtime.jit.JITFunction
        The kernel. Anything else (e.g. an ``InterpretedFunction``) is launched the plain way.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        # key -> (launch function, arguments between the stream and the kernel's, trailing kernel args)
        self._entries = {}
        self._packers = {}  # number of positional args -> generated packer
        self._enabled = self._fast_path_possible()
        self._bound = False  # Triton internals resolved (first call)

    def _fast_path_possible(self) -> bool:
        from triton.runtime.jit import JITFunction

        interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        return not interpreted and isinstance(self.kernel, JITFunction)

    def _disable(self, why: str) -> None:
        """Use the plain launch from now on (the installed Triton is not what we expect)."""
        if self._enabled:
            warnings.warn(f"attnplug fast Triton launch disabled for {self.kernel}: {why}", RuntimeWarning, stacklevel=3)
        self._enabled = False

    def _bind_triton_internals(self) -> None:
        """Resolve, once, the Triton objects read on every call; disable the fast path if they differ."""
        self._bound = True
        try:
            from triton import knobs
            from triton.runtime import driver

            active = driver.active
            self._current_device = getattr(torch._C, "_cuda_getDevice", None) or active.get_current_device
            self._current_stream = active.get_current_stream
            self._runtime_knobs, self._compilation_knobs = knobs.runtime, knobs.compilation
            for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
                if not isinstance(hook.calls, list):  # hook chains (triton >= 3.4) are what we check per call
                    raise TypeError(f"launch hook {hook!r} is not a hook chain")
            knobs.runtime.debug, knobs.compilation.instrumentation_mode  # noqa: B018 - presence check
            self._has_stage_hook_knob = hasattr(knobs.runtime, "add_stages_inspection_hook")
            for param in self.kernel.params:
                param.is_constexpr, param.name, param.default  # noqa: B018 - presence check
            self._pre_run_hooks = self.kernel.pre_run_hooks
            self.kernel.used_global_vals  # noqa: B018 - presence check
            self._direct_c_launch = triton.__version__.startswith(_DIRECT_C_LAUNCH_VERSIONS)
        except Exception as exc:  # noqa: BLE001 - any mismatch means: use the plain launch
            self._disable(f"unexpected Triton internals ({type(exc).__name__}: {exc})")

    def _fast_path_ready(self, grid) -> bool:
        """Whether this call may take a cached launch (else it must take the plain one)."""
        if not self._enabled or grid.__class__ is not tuple:
            return False
        if not self._bound:
            self._bind_triton_internals()
            if not self._enabled:
                return False
        rt = self._runtime_knobs
        # hooks only the plain launch honours
        return not (rt.launch_enter_hook.calls or rt.launch_exit_hook.calls or self._pre_run_hooks
                    or (self._has_stage_hook_knob and rt.add_stages_inspection_hook is not None))

    def __call__(self, grid, *args, **kwargs) -> None:
        if not self._fast_path_ready(grid):
            self.kernel[grid](*args, **kwargs)
            return
        device = self._current_device()
        kw = (self._runtime_knobs.debug, self._compilation_knobs.instrumentation_mode, *kwargs.items())
        try:
            key, call_args = self._packers[len(args)](device, kw, *args)
            entry = self._entries[key]
        except KeyError:  # no packer for this many args yet, or a new specialization
            self._first_launch(grid, device, kw, args, kwargs)
            return
        except (_Unsupported, TypeError):  # exotic argument, unhashable keyword value, too many args
            self.kernel[grid](*args, **kwargs)
            return
        self._launch_cached(entry, grid, device, call_args, args, kwargs)

    def launch_by_key(self, key, grid, call_args: tuple, args: tuple, **kwargs) -> None:
        """Launch with a specialization key made by the caller (see "Keyed launches" above).

        Parameters
        ----------
        key : hashable
            Must determine Triton's specialization of this kernel for these arguments completely
            (the current device and Triton's debug knobs are added here).
        grid : tuple of int
        call_args : tuple
            The kernel's positional arguments as the compiled kernel takes them: each tensor as its
            ``data_ptr()``, None as None, every other value as itself.
        args : tuple
            The same arguments as given to ``kernel[grid](...)`` (tensors as tensors), for the first
            launch under ``key`` and for the plain-launch fallbacks.
        **kwargs
            Launch options and keyword constexprs, as for ``kernel[grid](...)``; part of the key.
        """
        if not self._fast_path_ready(grid):
            self.kernel[grid](*args, **kwargs)
            return
        device = self._current_device()
        full_key = (_BY_KEY, device, self._runtime_knobs.debug, self._compilation_knobs.instrumentation_mode, key,
                    *kwargs.items())
        entry = self._entries.get(full_key)
        if entry is None:
            self._cache(full_key, self.kernel[grid](*args, **kwargs), args, kwargs)
            return
        self._launch_cached(entry, grid, device, call_args, args, kwargs)

    def _launch_cached(self, entry, grid, device, call_args, args, kwargs) -> None:
        launch_fn, middle, trailing = entry
        if self.kernel.used_global_vals:
            self._check_globals()
        n = len(grid)
        try:
            launch_fn(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, self._current_stream(device),
                      *middle, *call_args, *trailing)
        except Exception as exc:  # noqa: BLE001 - the launcher's calling convention changed: go plain
            self._disable(f"direct launch failed ({type(exc).__name__}: {exc})")
            self.kernel[grid](*args, **kwargs)

    def _first_launch(self, grid, device, kw, args, kwargs) -> None:
        """Plain launch (compiling if needed); cache the compiled kernel's handles under the call's key."""
        try:
            pack = self._packers.get(len(args))
            if pack is None:
                pack = self._packers[len(args)] = _make_arg_packer(self.kernel.params, len(args))
            key, _ = pack(device, kw, *args)
            hash(key)
        except (_Unsupported, TypeError):
            key = None
        compiled = self.kernel[grid](*args, **kwargs)
        if key is not None:
            self._cache(key, compiled, args, kwargs)

    def _cache(self, key, compiled, args, kwargs) -> None:
        """Remember ``compiled``'s launch handles under ``key`` (not for runtime values passed by keyword)."""
        trailing = []
        for param in self.kernel.params[len(args):]:
            if param.name in kwargs:
                if not param.is_constexpr:
                    return  # a runtime value passed by keyword: its value is in the key, don't cache
                trailing.append(kwargs[param.name])
            else:
                trailing.append(param.default)
        try:
            self._entries[key] = self._launch_entry(compiled, tuple(trailing))
        except Exception as exc:  # noqa: BLE001
            self._disable(f"unexpected CompiledKernel ({type(exc).__name__}: {exc})")

    def _launch_entry(self, compiled, trailing: tuple) -> tuple:
        """(launch function, arguments between the stream and the kernel's, trailing kernel args).

        Generic: ``CompiledKernel.run`` (the call ``JITFunction.run`` ends in, stable across 3.x),
        with no launch metadata and no hooks (checked empty on every call). On the Triton
        versions whose ``CudaLauncher.__call__`` we have read (it only allocates scratch memory,
        then calls its C ``launch``), kernels without scratch memory call that C function
        directly, saving a Python frame.
        """
        launcher = compiled.run
        if compiled.function is None:
            raise RuntimeError("compiled kernel has no function handle after a launch")
        if (self._direct_c_launch and type(launcher).__name__ == "CudaLauncher"
                and launcher.global_scratch_size == 0 and launcher.profile_scratch_size == 0):
            return (launcher.launch, (compiled.function, launcher.launch_cooperative_grid, launcher.launch_pdl,
                                      None, None, compiled.packed_metadata, None, None, None), trailing)
        return launcher, (compiled.function, compiled.packed_metadata, None, None, None), trailing

    def _check_globals(self) -> None:
        """Same check as JITFunction.run: globals a kernel reads must not change after compiling."""
        missing = object()
        for (name, _), (value, globals_dict) in self.kernel.used_global_vals.items():
            if (new := globals_dict.get(name, missing)) != value:
                raise RuntimeError(f"Global variable {name} has changed since we compiled this kernel, from {value} to {new}")


_LAUNCHERS: dict = {}  # id(kernel) -> FastLauncher (which holds the kernel, so ids stay unique)


def fast_launcher(kernel) -> FastLauncher:
    """The (shared) :class:`FastLauncher` of ``kernel``."""
    launcher = _LAUNCHERS.get(id(kernel))
    if launcher is None:
        launcher = _LAUNCHERS[id(kernel)] = FastLauncher(kernel)
    return launcher


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` with less host overhead; see the module docstring.

    Parameters
    ----------
    kernel : triton.runtime.jit.JITFunction
        An ``@triton.jit`` kernel.
    grid : tuple of int
        1 to 3 grid dimensions (a callable grid takes the plain launch).
    *args, **kwargs
        As for ``kernel[grid](...)``: runtime arguments positionally, constexprs positionally
        (cheapest) or by keyword, options (``num_warps``, ``num_stages``, ...) by keyword.
    """
    launcher = _LAUNCHERS.get(id(kernel))
    if launcher is None:
        launcher = fast_launcher(kernel)
    launcher(grid, *args, **kwargs)


__all__ = ["FastLauncher", "fast_launcher", "launch"]
