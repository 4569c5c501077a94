"""Which partition a series belongs to: a stable hash that any producer can compute.

Series ``s`` belongs to partition ``crc32(s) mod P`` of ``P``, where ``s`` is the
series id's UTF-8 bytes and CRC-32 is the one of zlib, gzip and PNG (IEEE 802.3; its
check value, of ``123456789``, is ``0xCBF43926``). Every language has it: Python
``zlib.crc32``, Go ``hash/crc32.ChecksumIEEE``, Java ``java.util.zip.CRC32``, Node
``zlib.crc32``. It never changes between versions, so a partition's series stay put.

>>> partition_of("123456789", 1000)  # 0xCBF43926 = 3421780262
262
>>> partition_of("sensor-7", 1)
0
"""

from __future__ import annotations

import zlib


def partition_of(series: str | bytes, partitions: int) -> int:
    """The partition (0 .. ``partitions`` - 1) of a series id."""
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    data = series.encode("utf-8") if isinstance(series, str) else series
    return zlib.crc32(data) % partitions
