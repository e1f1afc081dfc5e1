"""`dori rerun` of crafted ZIPs: every bad export exits 2 with one line, writes nothing and loads nothing unasked."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from analysis.cli import EXIT_BAD_INPUT, main
from analysis.export import save_export
from analysis.limits import MAX_EXPORT_DECODED_BYTES
from analysis.rerun import output_folder
from analysis.tasks import run_task


@pytest.fixture(scope="module")
def replicate_zip(tiny_model_folder, tmp_path_factory) -> Path:
    """A genuine export of a replicate run on the tiny folder, the base of the crafted ones."""
    from analysis.model import load_model

    record = run_task(load_model(str(tiny_model_folder)), "replicate", {"image": 0, "seeds": [0]})
    return save_export(record, tmp_path_factory.mktemp("genuine") / "replicate.zip")


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def crafted(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def with_config(source: Path, path: Path, **changes) -> Path:
    files = members(source)
    header = json.loads(files["config.json"])
    for key, value in changes.items():
        if key in header:
            header[key] = value
        else:
            header["config"][key] = value
    files["config.json"] = json.dumps(header).encode()
    return crafted(path, files)


def rerun_exit(capsys, *args: str) -> tuple[int, str]:
    code = main(["rerun", *map(str, args)])
    err = capsys.readouterr().err
    return code, err


def assert_refused(code: int, err: str, message: str) -> None:
    assert code == EXIT_BAD_INPUT, err
    assert message in err
    # One line says what is wrong (a model's loading bars may come before it), and no traceback.
    assert "Traceback" not in err and [line.startswith("dori rerun: error:") for line in err.splitlines()].count(True) == 1


def test_a_finetune_export_writes_only_inside_the_given_folder(tiny_model_folder, tmp_path, capsys):
    outside = tmp_path / "elsewhere" / "run"
    zip_path = crafted(tmp_path / "ft.zip", {"config.json": json.dumps(dict(
        format=1, kind="finetune", model=str(tiny_model_folder),
        config=dict(targets=[0], out_dir="../elsewhere/run"))).encode()})
    code, err = rerun_exit(capsys, zip_path, "--model", tiny_model_folder)
    assert_refused(code, err, "give a folder for its output")
    code, err = rerun_exit(capsys, zip_path, "--model", tiny_model_folder, "--out-dir", tmp_path / "mine")
    assert_refused(code, err, "outside the folder you gave")
    assert not outside.exists() and not (tmp_path / "mine").exists()


def test_an_absolute_output_folder_of_another_machine_lands_inside_the_given_folder(tmp_path):
    # An app's fine-tuning export names the app's own run folder.
    mine = tmp_path / "mine"
    assert output_folder(str(tmp_path / "server" / "runs" / "ab12"), mine) == mine.resolve() / "ab12"
    assert output_folder(str(mine / "sub"), mine) == mine.resolve() / "sub"
    assert output_folder("run", mine) == mine.resolve() / "run"
    with pytest.raises(ValueError, match="outside the folder you gave"):
        output_folder("/", mine)


def test_too_many_seeds_are_refused_before_anything_runs(replicate_zip, tmp_path, capsys, tiny_model_folder):
    zip_path = with_config(replicate_zip, tmp_path / "seeds.zip", seeds=list(range(100_000)))
    code, err = rerun_exit(capsys, zip_path, "--model", tiny_model_folder)
    assert_refused(code, err, "at most 64")


def test_the_model_is_loaded_only_when_named_on_the_command_line(replicate_zip, tiny_model_folder, tmp_path, capsys,
                                                                 monkeypatch):
    import analysis.model

    def no_loading(*args, **kwargs):
        raise AssertionError("rerun loaded a model the export named")

    monkeypatch.setattr(analysis.model, "load_model", no_loading)
    for model in ("CompVis/stable-diffusion-v1-4", str(tiny_model_folder)):
        code, err = rerun_exit(capsys, with_config(replicate_zip, tmp_path / "hub.zip", model=model))
        assert_refused(code, err, "name the model to rerun it on")


PEAK_OF_A_RERUN = """
import resource, sys
from analysis.cli import main
code = main(sys.argv[1:]) if len(sys.argv) > 1 else 0
print("peak KiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def child_peak_kib(*argv: str) -> tuple[int, int, str]:
    """`dori ARGV` in a fresh process: its exit code, its own peak resident memory and its stderr."""
    done = subprocess.run([sys.executable, "-c", PEAK_OF_A_RERUN, *argv], capture_output=True, text=True,
                          timeout=300)
    peak = int(done.stderr.rsplit("peak KiB", 1)[1].split()[0])
    return done.returncode, peak, done.stderr


def test_a_huge_config_is_refused_unread_with_bounded_memory(tmp_path):
    zip_path = crafted(tmp_path / "huge.zip", {"config.json": b'{"format": 1, "pad": "' + b" " * 300_000_000 + b'"}'})
    assert zip_path.stat().st_size < 2_000_000  # 300 MB that compress to little
    _, imports_only, _ = child_peak_kib()  # the same process that only imports the command line
    code, peak, err = child_peak_kib("rerun", str(zip_path))
    assert code == EXIT_BAD_INPUT and "unpacks to 300,000,0" in err, err
    # Refused before reading: far below the 300 MB the member would unpack to.
    assert peak - imports_only < 50_000


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width × height pixels but holds one row of data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (3 * width + 1)))
            + chunk(b"IEND", b""))


def corrupt_crc(source: Path, path: Path, invalid_deflate: bool = False) -> Path:
    """`source` with a byte of metrics.json's compressed data flipped (a bad CRC, or a stream zlib cannot decode
    at all, depending on the byte), or with its first byte set to a reserved deflate block type."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        info = archive.getinfo("metrics.json")
    # The member's compressed data starts after its 30-byte local header, name and extra field.
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    if invalid_deflate:
        data[start] = 0b111  # final block of type 3, which deflate reserves: "invalid block type"
    else:
        data[start + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("case, message", [
    ("bad CRC", "damaged ZIP"),
    ("broken compressed stream", "damaged ZIP"),
    ("corrupt tensors", "not a readable safetensors"),
    ("config not an object", "must hold a JSON object"),
    ("config's config not an object", "its config a JSON object"),
    ("deeply nested metrics", "metrics.json"),
    ("decompression bomb", "pixels"),
    ("not a PNG", "not a readable PNG"),
])
def test_crafted_exports_exit_2_with_one_line(case, message, replicate_zip, tiny_model_folder, tmp_path, capsys):
    files = members(replicate_zip)
    path = tmp_path / "crafted.zip"
    if case == "bad CRC":
        corrupt_crc(replicate_zip, path)
    elif case == "broken compressed stream":
        corrupt_crc(replicate_zip, path, invalid_deflate=True)
    else:
        if case == "corrupt tensors":
            files["tensors.safetensors"] = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"
        elif case == "config not an object":
            files["config.json"] = b"[1, 2, 3]"
        elif case == "config's config not an object":
            header = json.loads(files["config.json"])
            files["config.json"] = json.dumps({**header, "config": ["seeds"]}).encode()
        elif case == "deeply nested metrics":
            files["metrics.json"] = b"[" * 100_000 + b"]" * 100_000
        elif case == "decompression bomb":
            files["images/seed0.png"] = png_header_only(40_000, 40_000)
        elif case == "not a PNG":
            files["images/seed0.png"] = b"GIF89a, or anything but a PNG"
        crafted(path, files)
    code, err = rerun_exit(capsys, path, "--model", tiny_model_folder)
    assert_refused(code, err, message)


def test_a_genuine_export_still_reruns(replicate_zip, tiny_model_folder, capsys):
    code, err = rerun_exit(capsys, replicate_zip, "--model", tiny_model_folder)
    assert code == 0, err


def test_an_export_that_asks_a_huge_embedding_search_is_refused(replicate_zip, tiny_model_folder, tmp_path, capsys):
    from safetensors.torch import save as save_safetensors

    files = members(replicate_zip)
    header = json.loads(files["config.json"])
    header.update(kind="attack", config=dict(image=0, starts=[{"kind": "embedding", "input": "start"}]))
    files["config.json"] = json.dumps(header).encode()
    files["tensors.safetensors"] = save_safetensors({"input.start": torch.full((77, 32), 1e30)})
    code, err = rerun_exit(capsys, crafted(tmp_path / "huge-embedding.zip", files), "--model", tiny_model_folder)
    assert_refused(code, err, "accepted up to")


def test_images_that_add_up_past_the_decoded_limit_are_refused_before_decoding(replicate_zip, tiny_model_folder,
                                                                              tmp_path, capsys, monkeypatch):
    import analysis.export

    def no_decoding(*args):
        raise AssertionError("an image was decoded before the export's total size was checked")

    monkeypatch.setattr(analysis.export, "_image_member", no_decoding)
    files = members(replicate_zip)
    # Each image within the per-image limit (4096 × 4096), 12 of them over the total once decoded.
    files.update({f"images/big{i}.png": png_header_only(4096, 4096) for i in range(12)})
    code, err = rerun_exit(capsys, crafted(tmp_path / "many-big.zip", files), "--model", tiny_model_folder)
    assert_refused(code, err, f"once decoded; an export may take at most {MAX_EXPORT_DECODED_BYTES:,}")


@pytest.mark.parametrize("dtype", [["x"], {"a": 1}, 3, "float64"])
def test_a_recorded_dtype_that_is_not_one_is_refused(replicate_zip, tiny_model_folder, tmp_path, capsys, dtype):
    code, err = rerun_exit(capsys, with_config(replicate_zip, tmp_path / "dtype.zip", dtype=dtype),
                           "--model", tiny_model_folder)
    assert_refused(code, err, "unknown dtype")
