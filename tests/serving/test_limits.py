"""What a served model accepts: paths only inside an allowed folder, bounded rows, bytes and
pixels - checked on the real reader (`pyfunc.read_sources`) and decoder, no model needed."""

from __future__ import annotations

import base64
import io

import pandas as pd
import pytest
from PIL import Image

from experiments.data.decode import load_image
from experiments.serving.limits import (
    DEFAULT_MAX_ROWS,
    PATH_OUTSIDE_ROOT,
    PATHS_REFUSED,
    ServingLimits,
    unset,
)
from experiments.serving.pyfunc import read_sources
from tests.conftest import write_image


@pytest.fixture
def folders(tmp_path):
    """An allowed folder with an image, a symlink inside it that escapes it, and an image
    outside it."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    inside = write_image(allowed / "a.png")
    secret = write_image(outside / "secret.png")
    (allowed / "escape.png").symlink_to(secret)
    (allowed / "sub").mkdir()
    return allowed, inside, secret


def errors_of(frame: pd.DataFrame, limits: ServingLimits) -> list[str]:
    sources, _ = read_sources(frame, limits)
    return [str(s) if isinstance(s, ValueError) else "" for s in sources]


def test_paths_are_refused_by_default_with_one_message_for_existing_and_missing_files(folders):
    allowed, inside, secret = folders
    frame = pd.DataFrame({"path": [str(inside), str(secret), "/etc/passwd",
                                   "/no/such/file.png"]})
    assert errors_of(frame, ServingLimits()) == [PATHS_REFUSED] * 4


def test_paths_must_resolve_inside_the_allowed_folder(folders):
    allowed, inside, secret = folders
    limits = ServingLimits.resolve({"path_root": str(allowed)})
    frame = pd.DataFrame({"path": [
        str(inside),                      # inside: read
        "a.png",                          # relative paths start at the folder
        "sub/../a.png",                   # `..` that stays inside
        str(allowed / "escape.png"),      # a symlink inside whose target is outside
        str(allowed / ".." / "outside" / "secret.png"),  # `..` out of the folder
        str(secret), "/etc/passwd", "/no/such/file.png",  # outside, existing or not
        "missing.png",                    # inside, missing: the decoder says so
    ]})
    sources, _ = read_sources(frame, limits)
    assert sources[:3] == [str(inside.resolve())] * 3
    assert [str(s) for s in sources[3:8]] == [PATH_OUTSIDE_ROOT] * 5
    assert sources[8] == str((allowed / "missing.png").resolve())
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(sources[8], 32)


def test_images_over_the_byte_limit_are_refused_per_row_before_decoding(tmp_path, folders):
    allowed, inside, _ = folders
    small = inside.read_bytes()
    big = write_image(allowed / "big.png", size=120).read_bytes()  # ~43 KB of noise
    limits = ServingLimits.resolve({"max_image_bytes": len(small) + 10,
                                    "path_root": str(allowed)})
    frame = pd.DataFrame({"image": [base64.b64encode(small).decode(),
                                    base64.b64encode(big).decode(), big, None, None],
                          "path": [None, None, None, "a.png", "big.png"]})
    errors = errors_of(frame, limits)
    assert errors[0] == errors[3] == ""
    for error in (errors[1], errors[2], errors[4]):
        assert "this server accepts at most" in error and f"{len(small) + 10}" in error


def test_images_over_the_pixel_limit_are_refused_before_their_pixels_are_decoded():
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), (200, 120, 180)).save(buffer, format="PNG")  # tiny file
    with pytest.raises(ValueError, match="300x200 px is over the limit of 50000 pixels"):
        load_image(buffer.getvalue(), 32, name="row 0", max_pixels=50_000)
    assert load_image(buffer.getvalue(), 32, max_pixels=60_000).shape == (32, 32, 3)


def test_rows_over_the_limit_refuse_the_request():
    limits = ServingLimits(max_rows=3)
    limits.check_rows(3)
    with pytest.raises(ValueError, match="4 rows; this server answers at most 3 per request"):
        limits.check_rows(4)


def test_a_request_without_image_or_path_is_refused():
    with pytest.raises(ValueError, match="needs a column `image`.*Received columns: \\['foo'\\]"):
        read_sources(pd.DataFrame({"foo": [1]}), ServingLimits())


def test_limits_come_from_model_config_then_environment_then_defaults(tmp_path):
    env = {"EXPERIMENTS_SERVE_MAX_ROWS": "7", "EXPERIMENTS_SERVE_MAX_IMAGE_BYTES": "1000",
           "EXPERIMENTS_SERVE_PATH_ROOT": str(tmp_path)}
    limits = ServingLimits.resolve({"max_rows": 5}, env)
    assert (limits.max_rows, limits.max_image_bytes, limits.path_root) == (
        5, 1000, tmp_path.resolve())
    assert limits.max_image_pixels == ServingLimits().max_image_pixels
    assert ServingLimits.resolve(None, {}).path_root is None
    # a model is logged with every key declared and unset: the environment decides
    assert ServingLimits.resolve(unset(), env).max_rows == 7


@pytest.mark.parametrize(("config", "env", "message"), [
    ({}, {"EXPERIMENTS_SERVE_MAX_ROWS": "many"},
     "EXPERIMENTS_SERVE_MAX_ROWS must be a positive integer. Received: "
     "EXPERIMENTS_SERVE_MAX_ROWS='many'"),
    ({"max_rows": 0}, {}, "`max_rows` must be a positive integer. Received: max_rows=0"),
    ({"max_image_pixels": 10**9}, {}, "below Pillow's decompression-bomb limit"),
    ({"path_root": "/no/such/folder"}, {}, "path_root='/no/such/folder' "
     "\\(EXPERIMENTS_SERVE_PATH_ROOT\\)"),
    ({"max_row": 3}, {}, "Unknown serving setting\\(s\\) \\['max_row'\\]"),
])
def test_a_bad_limit_fails_at_load_naming_the_setting(config, env, message):
    with pytest.raises(ValueError, match=message):
        ServingLimits.resolve(config, env)


def test_the_environment_of_this_process_is_read_by_default(monkeypatch):
    monkeypatch.setenv("EXPERIMENTS_SERVE_MAX_IMAGE_PIXELS", "1234")
    limits = ServingLimits.resolve()
    assert (limits.max_image_pixels, limits.max_rows) == (1234, DEFAULT_MAX_ROWS)
