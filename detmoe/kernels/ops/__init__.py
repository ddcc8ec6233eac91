"""Our Triton kernels, one op per file (kernel, launcher, docstring).

Importing this subpackage is the moment the kernels are first needed: `runtime.prepare()` runs before any
kernel module is imported, so their @triton.jit functions are decorated for where they will run (compiled,
or under the interpreter on a machine without CUDA).

They live in this subpackage, not beside `detmoe/kernels/__init__.py`, because a submodule `kernels.matmul`
would be bound as an attribute of the package on import and shadow the dispatch function
`kernels.matmul(x, w)` (likewise softmax and attention).
"""
from detmoe.kernels import runtime

runtime.prepare()
