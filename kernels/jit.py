"""Interpreter or compiler: the decorator every Triton kernel of this package is made with.

Triton decides between its interpreter and its compiler when it is first imported
(TRITON_INTERPRET=1 then), and triton.language's own helpers are built at that moment; the
kernels here follow that decision (`INTERPRETED`) so they always match the helpers they call.
"""

import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

INTERPRETED = isinstance(tl.cdiv, InterpretedFunction)
jit = InterpretedFunction if INTERPRETED else JITFunction
