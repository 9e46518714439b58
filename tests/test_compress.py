"""Compressors write files that the standard gzip, 7z and zstd tools read back byte for byte."""

import shutil
import subprocess

import pytest
import torch

import bitsweep

READ_BACK = {
    "gzip": lambda archive, out: subprocess.run(["gzip", "-dc", archive], check=True, capture_output=True).stdout,
    "zstd": lambda archive, out: subprocess.run(["zstd", "-dc", archive], check=True, capture_output=True).stdout,
    "7z": lambda archive, out: (subprocess.run(["7z", "x", "-y", f"-o{out}", archive], check=True,
                                               capture_output=True), (out / "codes.bin").read_bytes())[1],
}


@pytest.mark.parametrize("name", ["gzip", "7z", "zstd"])
def test_standard_tools_read_back_the_archive(name, tmp_path):
    tool = {"gzip": "gzip", "zstd": "zstd", "7z": "7z"}[name]
    assert shutil.which(tool), f"{tool} is installed by the project's setup"
    codes = bitsweep.quantize_tensor(torch.randn(256, 512), "symmetric", 4).codes
    src = tmp_path / "codes.bin"
    src.write_bytes(codes.numpy().tobytes())
    archive = bitsweep.compress_file(src, name, tmp_path / "out")
    assert archive.name == "codes.bin" + bitsweep.compressors()[name].suffix
    assert archive.stat().st_size < src.stat().st_size, "4-bit codes stored one per byte must shrink"
    assert READ_BACK[name](archive, tmp_path / "extracted") == src.read_bytes()
    assert not [p for p in archive.parent.iterdir() if p.name.endswith(".tmp")], "no temporary left behind"


def test_gzip_output_is_deterministic(tmp_path):
    src = tmp_path / "data.bin"
    src.write_bytes(bytes(range(256)) * 100)
    first = bitsweep.compress_file(src, "gzip", tmp_path / "a").read_bytes()
    second = bitsweep.compress_file(src, "gzip", tmp_path / "b").read_bytes()
    assert first == second


def test_unknown_compressor_lists_the_available_ones(tmp_path):
    src = tmp_path / "x"
    src.write_bytes(b"x")
    with pytest.raises(bitsweep.BitsweepError, match="unknown compressor 'rar'; available: 7z, gzip, zstd"):
        bitsweep.compress_file(src, "rar")
