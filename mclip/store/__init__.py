"""The files on disk between stages: the teacher cache (shards + manifest), raw columns, the caption reader, the id join,
output folders (claim, lock, atomic writes, checksums) and their verification."""
