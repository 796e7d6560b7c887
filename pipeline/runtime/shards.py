"""Parquet shards: a table fitted to its shard type's schema, and a shard read by its footer or by a run of
its rows, without reading the rest."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def conform(table: pa.Table, schema: pa.Schema, *, what: str, keep_extra: bool = False) -> pa.Table:
    """`table`'s columns of `schema`, cast to it (`check_schema` first); with `keep_extra`, the table's other
    columns after them, as they are (what a scorer adds that this package does not know of)."""
    check_schema(table, schema, what=what)
    cast = table.select(schema.names).cast(schema)
    if not keep_extra:
        return cast
    extra = [n for n in table.column_names if n not in schema.names]
    fields = [*cast.schema, *(table.schema.field(n) for n in extra)]
    return pa.Table.from_arrays([*cast.columns, *(table[n] for n in extra)], schema=pa.schema(fields))


def check_schema(table: pa.Table, schema: pa.Schema, *, what: str) -> None:
    """Raise if `table` lacks a column of `schema` or has one of an incompatible type."""
    for f in schema:
        if f.name not in table.column_names:
            raise ValueError(f"{what}: missing column {f.name!r} (expected schema {schema})")
        got = table.schema.field(f.name).type
        if got != f.type and not _castable(got, f.type):
            raise ValueError(f"{what}: column {f.name!r} is {got}, expected {f.type}")


def _castable(src: pa.DataType, dst: pa.DataType) -> bool:
    if pa.types.is_null(src):
        return True
    if pa.types.is_integer(src) and pa.types.is_integer(dst):
        return True
    if pa.types.is_floating(src) and pa.types.is_floating(dst):
        return True
    if pa.types.is_list(src) or pa.types.is_large_list(src):
        return (pa.types.is_list(dst) or pa.types.is_large_list(dst)) and _castable(src.value_type, dst.value_type)
    if pa.types.is_string(src) or pa.types.is_large_string(src):
        return pa.types.is_string(dst) or pa.types.is_large_string(dst)
    return False


def shard_metadata(fs: pafs.FileSystem, path: str) -> tuple[int, dict[str, str]]:
    """(rows, the footer's key-value metadata) of a Parquet shard, from its footer alone."""
    meta = pq.read_metadata(path, filesystem=fs)
    return meta.num_rows, {k.decode(): v.decode() for k, v in (meta.metadata or {}).items() if k != b"ARROW:schema"}


def read_rows(fs: pafs.FileSystem, path: str, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a Parquet shard, reading only the row groups that hold them."""
    parquet = pq.ParquetFile(fs.open_input_file(path))
    groups, offsets, offset = [], [], 0
    for group in range(parquet.metadata.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if offset < stop and offset + rows > start:
            groups.append(group)
            offsets.append(offset)
        offset += rows
    if not groups:
        return parquet.schema_arrow.empty_table()
    return parquet.read_row_groups(groups).slice(start - offsets[0], stop - start)
