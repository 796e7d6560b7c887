"""The input's pieces (`pipeline.data.pieces`) as a Ray Data source: every piece read by a task of its own,
on whichever node has room, its records streamed out in blocks; nothing passes through the driver."""

from __future__ import annotations

from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from pipeline.data.pieces import PIECE_SCHEMA, Piece, piece_tables


class PiecesDatasource(Datasource):
    """One read task per piece, in the pieces' order (`PIECE_SCHEMA` blocks of `block_rows` rows)."""

    def __init__(self, pieces: list[Piece], *, block_rows: int = 4096):
        super().__init__()
        self.pieces = pieces
        self.block_rows = block_rows

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(p.size_bytes for p in self.pieces) or None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list:
        # The pieces are the unit of parallelism whatever Ray Data asks for: a piece is read whole by one task.
        return [
            ReadTask(
                lambda piece=piece, rows=self.block_rows: piece_tables(piece, rows=rows),
                BlockMetadata(num_rows=None, size_bytes=piece.size_bytes or None, exec_stats=None, input_files=None),
                schema=PIECE_SCHEMA,
                per_task_row_limit=per_task_row_limit,
            )
            for piece in self.pieces
        ]
