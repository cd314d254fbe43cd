"""The usage dataset's Parquet schema: the record's fields as columns."""

from __future__ import annotations

from typing import get_args

import pyarrow as pa
from pydantic import BaseModel

from serve_app.gateway.usage_records import UsageRecord

# The Parquet columns are the record's fields (one definition: a field added to the model
# is a column); these two keep a type of their own: `time` is Unix seconds in the record
# and a UTC timestamp for analysts, `status` an HTTP status.
ARROW_TYPES: dict[type, pa.DataType] = {
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
    str: pa.string(),
}
COLUMN_TYPES = {"time": pa.timestamp("ms", tz="UTC"), "status": pa.int32()}


def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    """`time` first, then the fields in the model's order."""
    columns = []
    for name, info in model.model_fields.items():
        base = next(a for a in (*get_args(info.annotation), info.annotation) if a in ARROW_TYPES)
        columns.append(pa.field(name, COLUMN_TYPES.get(name, ARROW_TYPES[base])))
    columns.sort(key=lambda f: f.name != "time")
    return pa.schema(columns)


SCHEMA = arrow_schema(UsageRecord)
