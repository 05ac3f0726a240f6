"""llamadiff: diff a hooked PyTorch Qwen2 against llama.cpp, op by op, on the same GGUF.

``harness.compare(gguf, prompt=..., steps=..., inject=[...])`` is the notebook entry point
(:func:`harness.notebook.compare`, returns a ``Run``). Importing ``harness`` stays cheap: nothing
heavy (torch, pandas, llama.cpp) is loaded until it is called.

``harness.compare`` is also the name of the comparison module (``harness/compare.py``), and
importing a submodule binds its name on the package, which would hide a plain function. So the
package keeps the module there and makes it callable: ``harness.compare(...)`` runs a
comparison, ``harness.compare.Comparison`` and ``from harness.compare import compare`` still
reach the module.
"""
import sys as _sys
import types as _types

__version__ = "0.1.0"


class _CallableModule(_types.ModuleType):
    """The ``harness.compare`` module, callable as :func:`harness.notebook.compare`."""

    def __call__(self, *args, **kwargs):
        from .notebook import compare
        return compare(*args, **kwargs)

    @property
    def __signature__(self):
        import inspect

        from .notebook import compare
        return inspect.signature(compare)


class _Package(_types.ModuleType):
    @property
    def compare(self):
        if "compare" not in self.__dict__:
            import importlib
            importlib.import_module(__name__ + ".compare")     # binds it through the setter
        return self.__dict__["compare"]

    @compare.setter
    def compare(self, module):     # the import system binding the harness.compare submodule
        if type(module) is _types.ModuleType:
            module.__class__ = _CallableModule
        self.__dict__["compare"] = module


_sys.modules[__name__].__class__ = _Package
