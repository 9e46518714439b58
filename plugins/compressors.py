"""gzip, 7z and zstd at their strongest standard settings, as the paper compares them."""

import gzip
import shutil

import py7zr
import zstandard

import bitsweep
from bitsweep.compress import Compressor

_CHUNK = 1 << 20


class Gzip(Compressor):
    name, suffix, description = "gzip", ".gz", "gzip -9 (DEFLATE)"

    def compress(self, src, dst):
        with open(src, "rb") as fin, open(dst, "wb") as raw:
            # mtime=0 and no file name: the same input always gives the same bytes.
            with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as fout:
                shutil.copyfileobj(fin, fout, _CHUNK)


class SevenZip(Compressor):
    name, suffix, description = "7z", ".7z", "7z archive, LZMA2 preset 9"

    def compress(self, src, dst):
        filters = [{"id": py7zr.FILTER_LZMA2, "preset": 9}]
        with py7zr.SevenZipFile(dst, "w", filters=filters) as archive:
            archive.write(src, arcname=src.name)


class Zstd(Compressor):
    name, suffix, description = "zstd", ".zst", "zstd level 19"

    def compress(self, src, dst):
        params = zstandard.ZstdCompressionParameters.from_level(19, write_checksum=True, write_content_size=True)
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            zstandard.ZstdCompressor(compression_params=params).copy_stream(fin, fout, size=src.stat().st_size)


@bitsweep.hookimpl
def register_compressors():
    return [Gzip(), SevenZip(), Zstd()]
