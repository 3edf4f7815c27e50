"""Elementwise ops: unary, binary, comparison, logical and bitwise."""
import mlx.core as mx

from .registry import PROMOTE, lowering

# Floating-point unary functions: integer inputs are computed in the default float dtype.
_FLOAT_UNARY = {
    "exp": mx.exp, "expm1": mx.expm1, "log": mx.log, "log2": mx.log2, "log10": mx.log10,
    "log1p": mx.log1p, "sqrt": mx.sqrt, "rsqrt": mx.rsqrt, "sin": mx.sin, "cos": mx.cos,
    "tan": mx.tan, "asin": mx.arcsin, "acos": mx.arccos, "atan": mx.arctan, "sinh": mx.sinh,
    "cosh": mx.cosh, "tanh": mx.tanh, "asinh": mx.arcsinh, "acosh": mx.arccosh,
    "atanh": mx.arctanh, "sigmoid": mx.sigmoid, "erf": mx.erf, "erfinv": mx.erfinv,
}
for _name, _fn in _FLOAT_UNARY.items():
    lowering(_name, promote=PROMOTE.INT_TO_FLOAT)(lambda self, _fn=_fn: _fn(self))


@lowering("abs", promote=PROMOTE.DEFAULT)
def abs_(self):
    return mx.abs(self)


@lowering("neg", promote=PROMOTE.DEFAULT)
def neg(self):
    return mx.negative(self)


@lowering("isnan", promote=PROMOTE.ALWAYS_BOOL)
def isnan(self):
    return mx.isnan(self)


@lowering("add.Tensor", promote=PROMOTE.DEFAULT)
def add(self, other, alpha=1):
    return mx.add(self, other if alpha == 1 else mx.multiply(other, alpha))


@lowering("sub.Tensor", promote=PROMOTE.DEFAULT)
def sub(self, other, alpha=1):
    return mx.subtract(self, other if alpha == 1 else mx.multiply(other, alpha))


@lowering("mul.Tensor", promote=PROMOTE.DEFAULT)
def mul(self, other):
    return mx.multiply(self, other)


@lowering("div.Tensor", promote=PROMOTE.INT_TO_FLOAT)
def div(self, other):
    return mx.divide(self, other)


_COMPARISONS = {"eq": mx.equal, "ne": mx.not_equal, "lt": mx.less, "le": mx.less_equal,
                "gt": mx.greater, "ge": mx.greater_equal}
for _name, _fn in _COMPARISONS.items():
    lowering(f"{_name}.Tensor", f"{_name}.Scalar", promote=PROMOTE.DEFAULT)(
        lambda self, other, _fn=_fn: _fn(self, other))
