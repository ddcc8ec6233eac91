"""Our Triton kernels, one op per file (kernel, launcher, docstring).

They live in this subpackage, not beside `kernels/__init__.py`, because a submodule `kernels.matmul`
would be bound as an attribute of the package on import and shadow the dispatch function
`kernels.matmul(x, w)` (likewise softmax and attention).
"""
