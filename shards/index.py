"""The shard index: for every image in a shard set, which shard, sample and member hold it."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from placeforge.fileio import write_parquet_atomic

INDEX_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("place_id", pa.int64(), nullable=False),
        pa.field("shard_index", pa.int32(), nullable=False),
        pa.field("sample_key", pa.string(), nullable=False),
        pa.field("member", pa.string(), nullable=False),  # e.g. "003.jpg"
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("jpeg_bytes", pa.int32(), nullable=False),  # size of the re-encoded image
        pa.field("source_sha1", pa.string(), nullable=False),  # hex digest of the input file's bytes
    ]
)


def index_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)


def write_index(table: pa.Table, path: str | os.PathLike) -> None:
    write_parquet_atomic(table.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA), path)


def read_index(path: str | os.PathLike) -> pa.Table:
    return pq.read_table(path).select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)
