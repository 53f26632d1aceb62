"""calculator: arithmetic on an AST walk over a whitelist of nodes, never `eval`.

Numbers, + - * / // % **, parentheses, a few functions of `math` and the constants pi, e and
tau. Powers and factorials are bounded, so "9**9**9" is refused rather than left to run.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Annotated, Any

from pydantic import Field

from sorai.apps.agent.tools import Tool, ToolFailure, tool

MAX_LENGTH = 500
MAX_EXPONENT = 10_000
MAX_DIGITS = 10_000

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {
    name: getattr(math, name)
    for name in [
        "sqrt",
        "exp",
        "log",
        "log10",
        "log2",
        "sin",
        "cos",
        "tan",
        "asin",
        "acos",
        "atan",
        "atan2",
        "sinh",
        "cosh",
        "tanh",
        "degrees",
        "radians",
        "floor",
        "ceil",
        "hypot",
        "gcd",
        "lcm",
        "comb",
        "perm",
    ]  # fmt: skip
}
_FUNCTIONS.update(abs=abs, round=round, min=min, max=max)
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _check_size(value: Any) -> Any:
    if isinstance(value, int) and value.bit_length() > MAX_DIGITS * 3.33:
        raise ToolFailure(f"the result has more than {MAX_DIGITS} digits")
    return value


def _eval(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolFailure(f"exponents above {MAX_EXPONENT} are refused")
        return _check_size(_BINARY[type(node.op)](left, right))
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCTIONS
        and not node.keywords
    ):
        args = [_eval(a) for a in node.args]
        if node.func.id in ("comb", "perm") and any(abs(a) > MAX_EXPONENT for a in args):
            raise ToolFailure(f"{node.func.id} of numbers above {MAX_EXPONENT} is refused")
        return _check_size(_FUNCTIONS[node.func.id](*args))
    what = ast.unparse(node) if isinstance(node, ast.expr) else type(node).__name__
    raise ToolFailure(
        f"{what!r} is not arithmetic (allowed: numbers, + - * / // % **, parentheses, "
        f"{', '.join(sorted(_FUNCTIONS))}, {', '.join(_CONSTANTS)})"
    )


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression; ToolFailure says what is wrong with a bad one."""
    text = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/")
    text = text.replace(",", "") if "(" not in text else text  # "1,234 * 2" means 1234
    if len(text) > MAX_LENGTH:
        raise ToolFailure(f"the expression is longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ToolFailure(f"not an expression: {e.msg}") from None
    try:
        value = _eval(tree)
    except ZeroDivisionError:
        raise ToolFailure("division by zero") from None
    except (ValueError, OverflowError, TypeError) as e:
        raise ToolFailure(str(e)) from None
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


# What guided decoding lets a model write: numbers joined by operators, with parentheses and
# signs; no letters, so no "{{number}}" template and no words, and no comma to start a list
# with. Only the schema carries it: `evaluate` accepts more (math functions, "1,234") and says
# what is wrong with the rest, which tells a model without guided decoding more than a regex.
_NUMBER = r"[(-]*[0-9]+(\.[0-9]+)?\)*"
EXPRESSION_PATTERN = rf"^{_NUMBER}( ?(\*\*|//|[-+*/%^]) ?{_NUMBER})*$"
SCHEMA_LENGTH = 200


# The descriptions are worded so: with the pattern, which the prompt shows too, other wordings
# led the default model to write "1234.5678" for 1234 * 5678.
def calculator(
    expression: Annotated[
        str,
        Field(
            description="e.g. 2 * (3 + 4)",
            min_length=1,
            max_length=MAX_LENGTH,
            json_schema_extra={"pattern": EXPRESSION_PATTERN, "maxLength": SCHEMA_LENGTH},
        ),
    ],
) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses."""
    return str(evaluate(expression))


def calculator_tool() -> Tool:
    return tool(calculator, timeout=5.0)
