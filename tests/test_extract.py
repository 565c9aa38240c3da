"""Feature cache on 32 real easy-VQA images through the real EfficientNet-Lite0."""
from __future__ import annotations

import dataclasses
import filecmp
import logging
import shutil

import h5py
import numpy as np
import pytest

from pipeline.images import load_image
from pipeline.manifest import Manifest
from pipeline.extraction import cache_key, extract_split
from pipeline.features import FeatureCache
from pipeline.errors import CacheError


@pytest.fixture(scope="module")
def extracted(manifest32, easyvqa_root, lite0, tmp_path_factory):
    out = tmp_path_factory.mktemp("features")
    return extract_split(manifest32, easyvqa_root, lite0, out, batch_size=16, block_size=8), out


def test_cached_tokens_equal_direct_forward(extracted, manifest32, easyvqa_root, lite0):
    result, _ = extracted
    images = [load_image(easyvqa_root / r.image_path) for r in manifest32.images]
    direct = lite0.encode(images).numpy()  # (32, 49, 1280)
    assert direct.shape == (32, 49, 1280)
    with FeatureCache(result.path) as cache:
        assert cache.ids == [r.image_id for r in manifest32.images]
        cached = cache.tokens().astype(np.float32)
        assert cache.attrs["cache_key"] == result.key
        assert cache.attrs["encoder"] == "efficientnet-lite0"
        assert cache.attrs["dtype"] == "float16"
    assert cached.shape == direct.shape
    # float16 keeps 11 significant bits: relative error <= 2**-11 (plus subnormal slack)
    np.testing.assert_allclose(cached, direct, rtol=2**-11, atol=1e-4)
    # the tokens carry information: different images give different features
    assert np.abs(cached[0] - cached[1]).mean() > 1e-2


def test_second_run_is_a_hit(extracted, manifest32, easyvqa_root, lite0, caplog):
    result, out = extracted
    caplog.set_level(logging.INFO, logger="pipeline.extraction")
    before = result.path.stat().st_mtime_ns
    again = extract_split(manifest32, easyvqa_root, lite0, out, batch_size=16, block_size=8)
    assert again.hit and again.n_encoded == 0 and again.path == result.path
    assert result.path.stat().st_mtime_ns == before
    assert "cache hit" in caplog.text


def test_resume_is_byte_identical(extracted, manifest32, easyvqa_root, lite0, tmp_path):
    result, _ = extracted
    partial = extract_split(manifest32, easyvqa_root, lite0, tmp_path, batch_size=4, block_size=8, stop_after_blocks=2)
    assert not partial.path.exists()
    assert len(list((tmp_path / f"{result.key}.parts").glob("block-*.npz"))) == 2
    resumed = extract_split(manifest32, easyvqa_root, lite0, tmp_path, batch_size=16, block_size=8)
    assert resumed.n_encoded == 16  # only the two missing blocks
    assert filecmp.cmp(result.path, resumed.path, shallow=False)
    assert not (tmp_path / f"{result.key}.parts").exists()


def test_corrupt_and_missing_images_are_skipped(manifest32, easyvqa_root, lite0, tmp_path):
    root = tmp_path / "images"
    rows = []
    for row in manifest32.images[:6]:
        dst = root / row.image_path
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(easyvqa_root / row.image_path, dst)
        rows.append(row)
    (root / rows[1].image_path).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)  # corrupt PNG
    (root / rows[4].image_path).unlink()  # missing file
    manifest = Manifest("train", manifest32.image_root, rows)
    result = extract_split(manifest, root, lite0, tmp_path / "features", batch_size=4, block_size=4)
    reasons = {f["image_id"]: f["reason"] for f in result.failed}
    assert set(reasons) == {rows[1].image_id, rows[4].image_id}
    assert reasons[rows[4].image_id].startswith("missing file")
    assert reasons[rows[1].image_id].startswith("unreadable image")
    with FeatureCache(result.path) as cache:
        assert len(cache.ids) == 4 and cache.tokens().shape == (4, 49, 1280)
        assert {f["image_id"] for f in cache.failed} == set(reasons)


def test_key_ignores_batch_size_but_not_content(manifest32, lite0):
    base = cache_key(manifest32, lite0, "float16")
    changed = Manifest("train", manifest32.image_root, [dataclasses.replace(manifest32.images[0], image_sha256="0" * 64)]
                            + manifest32.images[1:])
    assert cache_key(changed, lite0, "float16") != base
    assert cache_key(manifest32, lite0, "float32") != base


def test_tokens_by_id_in_any_order_with_repeats(extracted):
    result, _ = extracted
    with FeatureCache(result.path) as cache:
        every = cache.tokens()
        ids = [cache.ids[5], cache.ids[2], cache.ids[5], cache.ids[30]]
        picked = cache.tokens(ids)
    np.testing.assert_array_equal(picked, every[[5, 2, 5, 30]])


def test_sparse_reads_equal_dense_ones(extracted):
    """A scattered request (a random training batch of a large split) reads chunk by chunk, same values."""
    result, _ = extracted
    with FeatureCache(result.path) as cache:
        every = cache.tokens()
        rows = np.array([31, 0, 17, 0])  # span 32 for 3 distinct rows: read row by row
        np.testing.assert_array_equal(cache.read_rows(rows), every[rows])


def test_corrupt_chunk_is_caught_on_read_in_one_line(extracted, tmp_path):
    result, _ = extracted
    path = tmp_path / "corrupt.h5"
    shutil.copy(result.path, path)
    with h5py.File(path, "r") as f:
        assert f["tokens"].fletcher32
        offset = f["tokens"].id.get_chunk_info(3).byte_offset  # sample 3's chunk
        victim = f["image_ids"][3].decode()
    with open(path, "r+b") as f:
        f.seek(offset + 100)
        byte = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with FeatureCache(path) as cache:
        np.testing.assert_array_equal(cache.read_rows(np.array([0, 1])), cache.read_rows(np.array([0, 1])))
        with pytest.raises(CacheError) as err:
            cache.read_rows(np.array([2, 3, 4]))
    message = str(err.value)
    assert message.startswith(f"{path}: sample {victim!r} (row 3) is corrupt") and "\n" not in message


@pytest.mark.slow
def test_two_dask_workers_give_the_inline_file_byte_for_byte(manifest32, easyvqa_root, lite0, tmp_path):
    from pipeline.extraction import ShardCluster

    manifest = Manifest("train", manifest32.image_root, manifest32.images[:32] * 2)  # 64 images, 8 shards
    manifest = Manifest("train", manifest.image_root,
                             [dataclasses.replace(r, image_id=f"{r.image_id}-{k}") for k, r in enumerate(manifest.images)])
    inline = extract_split(manifest, easyvqa_root, lite0, tmp_path / "inline", batch_size=8, block_size=8)
    with ShardCluster(workers=2) as cluster:
        sharded = extract_split(manifest, easyvqa_root, lite0, tmp_path / "dask", batch_size=8, block_size=8,
                                cluster=cluster)
    assert sharded.n_encoded == 64 and sharded.key == inline.key
    assert filecmp.cmp(inline.path, sharded.path, shallow=False)
    assert not (tmp_path / "dask" / f"{sharded.key}.parts").exists()


def test_a_damaged_shard_part_or_cache_file_is_discarded_and_made_again(extracted, manifest32, easyvqa_root,
                                                                        lite0, tmp_path, caplog):
    """Damage that happens after a file was written whole (a bad disk, a copy cut short): the damaged
    part or cache file is named in the log, discarded, and made again byte for byte."""
    result, _ = extracted
    extract_split(manifest32, easyvqa_root, lite0, tmp_path, batch_size=4, block_size=8, stop_after_blocks=2)
    part = tmp_path / f"{result.key}.parts" / "block-00001.npz"
    part.write_bytes(part.read_bytes()[:100])  # truncated
    caplog.set_level(logging.WARNING, logger="pipeline.extraction")
    resumed = extract_split(manifest32, easyvqa_root, lite0, tmp_path, batch_size=16, block_size=8)
    assert resumed.n_encoded == 24 and f"{part}: damaged shard part" in caplog.text
    assert filecmp.cmp(result.path, resumed.path, shallow=False)
    resumed.path.write_bytes(resumed.path.read_bytes()[:1000])
    again = extract_split(manifest32, easyvqa_root, lite0, tmp_path, batch_size=16, block_size=8)
    assert not again.hit and again.n_encoded == 32 and "discarded, extracting it again" in caplog.text
    assert filecmp.cmp(result.path, again.path, shallow=False)


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: a decompression bomb to a decoder that believes it."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def test_unexpected_modes_decode_and_hostile_files_are_skipped_with_their_reason(manifest32, easyvqa_root, lite0,
                                                                                 tmp_path):
    """CMYK, 16-bit, palette with transparency, grey with alpha and 1-bit images are encoded (16-bit scaled to 8,
    not clipped white); a zero-byte file, a truncated one and decompression bombs are skipped, each with a
    reason naming it."""
    from PIL import Image

    from pipeline.images import load_image

    rgb = Image.open(easyvqa_root / manifest32.images[0].image_path).convert("RGB")
    grey16 = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    modes = {"cmyk.jpg": rgb.convert("CMYK"), "grey16.png": grey16, "palette.png": palette,
             "grey_alpha.png": rgb.convert("LA"), "bits.png": rgb.convert("1")}
    root = tmp_path / "images"
    root.mkdir()
    for name, img in modes.items():
        img.save(root / name, **({"transparency": 0} if name == "palette.png" else {}))
    good = (root / "grey_alpha.png").read_bytes()
    hostile = {"empty.png": b"", "truncated.png": good[: len(good) // 2],
               "bomb.png": png_claiming(20_000, 20_000), "near_bomb.png": png_claiming(10_000, 10_000)}
    for name, data in hostile.items():
        (root / name).write_bytes(data)
    assert np.abs(np.asarray(load_image(root / "grey16.png"), dtype=int)
                  - np.asarray(rgb.convert("L").convert("RGB"), dtype=int)).max() <= 1
    rows = [dataclasses.replace(manifest32.images[i], image_id=name, image_path=name)
            for i, name in enumerate([*modes, *hostile])]
    result = extract_split(Manifest("train", manifest32.image_root, rows), root, lite0, tmp_path / "features",
                           batch_size=4, block_size=4)
    reasons = {f["image_id"]: f["reason"] for f in result.failed}
    assert set(reasons) == set(hostile)
    assert all(reason.startswith(f"unreadable image {name}:") for name, reason in reasons.items())
    assert "DecompressionBomb" in reasons["bomb.png"] and "DecompressionBomb" in reasons["near_bomb.png"]
    with FeatureCache(result.path) as cache:
        assert sorted(cache.ids) == sorted(modes) and np.isfinite(cache.tokens()).all()
