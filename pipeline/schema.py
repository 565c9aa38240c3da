"""The params schema's building blocks: the section decorator and the field types with their bounds.

Kept apart from pipeline/config.py so that a module declaring its own params section (a method,
pipeline/methods/<name>.py) needs only these, and pipeline/config.py can assemble the sections.
"""
from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from pydantic.dataclasses import dataclass as pydantic_dataclass

section = pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))


def _number(value: Any) -> Any:
    """A float field takes ints and numeric strings (YAML reads 1e-8, without a dot, as a string), never bools."""
    if isinstance(value, bool):
        raise ValueError("a bool")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


# Field types; `description` is the range a message states ("expected a number > 0, got -1").
Number = Annotated[float, BeforeValidator(_number)]
Int = StrictInt
Str = StrictStr
Bool = StrictBool
PositiveInt = Annotated[StrictInt, Field(gt=0, description="an integer > 0")]
NonNegativeInt = Annotated[StrictInt, Field(ge=0, description="a value >= 0")]
Positive = Annotated[Number, Field(gt=0, description="a number > 0")]
NonNegative = Annotated[Number, Field(ge=0, description="a value >= 0")]
Fraction = Annotated[Number, Field(ge=0, le=1, description="a value in [0, 1]")]
OptionalPositive = Optional[Annotated[Number, Field(gt=0, description="a number > 0, or null")]]
