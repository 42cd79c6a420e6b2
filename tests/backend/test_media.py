"""Image fetching against real loopback servers: where credentials go, URL forms, limits, decoding."""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from backend.errors import MediaError
from backend.ls_auth import LabelStudioAuth
from backend.media import ImageFetcher, decode_image
from tests.backend.http_servers import FakeLabelStudio, Request, Server, serve, write_tree

TOKEN = "legacy-token-123"


def png(width: int = 8, height: int = 6, color: tuple[int, ...] = (200, 30, 40), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def image_bytes(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


PNG = png()


@pytest.fixture
def ls() -> Iterator[FakeLabelStudio]:
    with serve(FakeLabelStudio(legacy_token=TOKEN)) as server:
        server.protect("/data/upload/1/cat.png", (200, {"Content-Type": "image/png"}, PNG))
        server.protect("/data/local-files/", (200, {"Content-Type": "image/png"}, PNG))
        yield server


@pytest.fixture
def other() -> Iterator[Server]:
    with serve() as server:
        server.route("/img.png", body=PNG, headers={"Content-Type": "image/png"})
        yield server


def fetcher(ls: Server, *, key: str | None = TOKEN, **kwargs: Any) -> ImageFetcher:
    auth = LabelStudioAuth(ls.url, key) if key else None
    options: dict[str, Any] = {"local_files_root": None, "allowed_hosts": (), "max_bytes": 10**6,
                               "max_pixels": 10**6, "timeout": 5.0, **kwargs}
    return ImageFetcher(ls.url, auth, **options)


def _host_port(server: Server) -> str:
    return server.url.removeprefix("http://")


# --- where credentials go ------------------------------------------------------------------------------------------

def test_upload_path_is_fetched_from_ls_with_token(ls: FakeLabelStudio) -> None:
    image = fetcher(ls).fetch("/data/upload/1/cat.png", task_id=1)
    assert image.mode == "RGB" and image.size == (8, 6) and image.getpixel((0, 0)) == (200, 30, 40)
    assert ls.auth_headers() == [f"Token {TOKEN}"]


def test_upload_falls_back_to_the_storage_proxy(ls: FakeLabelStudio) -> None:
    ls.protect("/storage-data/uploaded/", lambda request: (200, {}, png(3, 2)) if request.query == {
        "filepath": ["upload/1/new file.png"]} else (404, {}, b""))
    assert fetcher(ls).fetch("/data/upload/1/new%20file.png").size == (3, 2)
    assert [r.path for r in ls.requests] == ["/data/upload/1/new%20file.png", "/storage-data/uploaded/"]
    assert ls.auth_headers() == [f"Token {TOKEN}"] * 2
    with pytest.raises(MediaError, match="does not exist"):
        fetcher(ls).fetch("/data/upload/1/missing.png")


def test_without_credentials_ls_refusal_is_explained(ls: FakeLabelStudio) -> None:
    with pytest.raises(MediaError, match="set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY") as info:
        fetcher(ls, key=None).fetch("/data/upload/1/cat.png")
    assert (info.value.status, info.value.code) == (502, "media_unauthorized")
    with pytest.raises(MediaError, match="refused our credentials: check LABEL_STUDIO_API_KEY"):
        fetcher(ls, key="wrong-token").fetch("/data/upload/1/cat.png")


def test_other_host_is_forbidden_unless_allowed_and_never_gets_credentials(ls: FakeLabelStudio, other: Server) -> None:
    with pytest.raises(MediaError, match="not allowed") as info:
        fetcher(ls).fetch(other.url + "/img.png")
    assert (info.value.status, info.value.code) == (403, "media_forbidden")
    assert other.requests == []
    for entry in ("127.0.0.1", _host_port(other)):
        assert fetcher(ls, allowed_hosts=[entry]).fetch(other.url + "/img.png").size == (8, 6)
    assert other.auth_headers() == [None, None]
    assert ls.requests == []


def test_absolute_ls_url_gets_credentials(ls: FakeLabelStudio) -> None:
    fetcher(ls).fetch(ls.url + "/data/upload/1/cat.png")
    assert ls.auth_headers() == [f"Token {TOKEN}"]


def test_allow_list_forms(ls: FakeLabelStudio) -> None:
    images = fetcher(ls, allowed_hosts=["*.example.com", "cdn.test:8443", "Pics.Org"])
    assert images.is_allowed("https://a.b.example.com/x.png") and images.is_allowed("http://example.com/x.png")
    assert not images.is_allowed("http://badexample.com/x.png")
    assert images.is_allowed("https://cdn.test:8443/x") and not images.is_allowed("https://cdn.test/x")
    assert images.is_allowed("http://pics.org:9000/x")
    assert images.is_allowed(ls.url + "/anything") and not images.is_allowed("ftp://pics.org/x")


def test_redirect_off_host_drops_credentials(ls: FakeLabelStudio, other: Server) -> None:
    ls.protect("/go", lambda request: (302, {"Location": other.url + "/img.png"}, b""))
    assert fetcher(ls, allowed_hosts=[_host_port(other)]).fetch("/go").size == (8, 6)
    assert ls.auth_headers() == [f"Token {TOKEN}"]
    assert other.auth_headers() == [None]


def test_redirect_to_a_forbidden_host_is_refused(ls: FakeLabelStudio, other: Server) -> None:
    ls.protect("/go", lambda request: (302, {"Location": other.url + "/img.png"}, b""))
    with pytest.raises(MediaError, match=f"redirects to {_host_port(other)}, which is not allowed") as info:
        fetcher(ls).fetch("/go")
    assert info.value.status == 403
    assert other.requests == []


def test_redirect_back_to_ls_and_loops(ls: FakeLabelStudio, other: Server) -> None:
    other.route("/back", status=307, headers={"Location": ls.url + "/data/upload/1/cat.png"})
    assert fetcher(ls, allowed_hosts=[_host_port(other)]).fetch(other.url + "/back").size == (8, 6)
    assert other.auth_headers() == [None] and ls.auth_headers() == [f"Token {TOKEN}"]
    other.route("/loop", status=302, headers={"Location": "/loop"})
    with pytest.raises(MediaError, match="more than 5 redirects"):
        fetcher(ls, allowed_hosts=[_host_port(other)]).fetch(other.url + "/loop")


def test_cloud_uri_is_presigned_by_ls(ls: FakeLabelStudio, other: Server) -> None:
    ls.add_presign(5, lambda uri: other.url + "/img.png?X-Amz-Signature=secret&key=" + uri)
    image = fetcher(ls).fetch("s3://bucket/images/cat.png", task_id=5)
    assert image.size == (8, 6)
    presign = ls.requests[0]
    assert presign.path == "/tasks/5/presign/" and presign.headers["authorization"] == f"Token {TOKEN}"
    assert other.auth_headers() == [None]
    assert other.requests[0].query["key"] == ["s3://bucket/images/cat.png"]
    with pytest.raises(MediaError, match="needs the task id"):
        fetcher(ls).fetch("gs://bucket/a.png")


def test_storage_redirect_beyond_the_presigned_hop_is_rechecked(ls: FakeLabelStudio, other: Server) -> None:
    other.route("/hop", status=302, headers={"Location": "http://localhost:9/elsewhere.png"})
    ls.add_presign(5, lambda uri: other.url + "/hop")
    with pytest.raises(MediaError, match="localhost:9, which is not allowed"):
        fetcher(ls).fetch("azure-blob://container/a.png", task_id=5)


def test_pat_refresh_and_retry_on_401(ls: FakeLabelStudio) -> None:
    images = fetcher(ls, key=ls.make_pat())
    images.fetch("/data/upload/1/cat.png")
    images.fetch("/data/upload/1/cat.png")
    assert ls.refreshes == 1  # access token cached between downloads
    ls.revoke_access_tokens()
    assert images.fetch("/data/upload/1/cat.png").size == (8, 6)
    assert ls.refreshes == 2
    media = [r.headers["authorization"] for r in ls.requests if r.path.startswith("/data/")]
    assert len(media) == 4 and all(h.startswith("Bearer ") for h in media) and media[2] != media[3]


def test_pat_access_token_renewed_before_it_expires() -> None:
    with serve(FakeLabelStudio(access_lifetime=1.0)) as ls:
        ls.protect("/data/upload/1/cat.png", (200, {}, PNG))
        images = fetcher(ls, key=ls.make_pat())
        images.fetch("/data/upload/1/cat.png")
        time.sleep(1.0)  # past exp - lifetime / 5: renewed up front, no 401 round trip
        images.fetch("/data/upload/1/cat.png")
        assert ls.refreshes == 2
        assert [r.path for r in ls.requests].count("/data/upload/1/cat.png") == 2


def test_pat_refused_twice_gives_up_after_one_retry(ls: FakeLabelStudio) -> None:
    ls.routes["/always401"] = lambda request: (401, {}, b"")
    with pytest.raises(MediaError, match="refused our credentials"):
        fetcher(ls, key=ls.make_pat()).fetch("/always401")
    assert len([r for r in ls.requests if r.path == "/always401"]) == 2 and ls.refreshes == 2


# --- local files ---------------------------------------------------------------------------------------------------

@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_tree(tmp_path / "docs", {"images/a b.png": png(5, 4), "images/sub/c.png": png(3, 3)})
    write_tree(tmp_path, {"secret.png": png(2, 2)})
    os.symlink(tmp_path / "secret.png", tmp_path / "docs" / "images" / "link.png")
    return tmp_path / "docs"


def test_local_files_read_from_the_document_root(ls: FakeLabelStudio, root: Path) -> None:
    images = fetcher(ls, local_files_root=root)
    assert images.fetch("/data/local-files/?d=images/a%20b.png").size == (5, 4)
    assert images.fetch("/data/local-files/?d=/images/sub/c.png").size == (3, 3)
    assert ls.requests == []


@pytest.mark.parametrize("d", ["../secret.png", "images/../../secret.png", "..%2Fsecret.png", "images/link.png",
                               "images/%2e%2e/%2e%2e/secret.png"])
def test_local_files_traversal_is_refused(ls: FakeLabelStudio, root: Path, d: str) -> None:
    with pytest.raises(MediaError, match="outside LOCAL_FILES_DOCUMENT_ROOT") as info:
        fetcher(ls, local_files_root=root).fetch(f"/data/local-files/?d={d}")
    assert (info.value.status, info.value.code) == (403, "media_forbidden")


def test_local_files_missing_or_without_path(ls: FakeLabelStudio, root: Path) -> None:
    with pytest.raises(MediaError, match="does not exist") as info:
        fetcher(ls, local_files_root=root).fetch("/data/local-files/?d=images/nope.png")
    assert info.value.code == "image_not_found"
    with pytest.raises(MediaError, match="no d=<path>"):
        fetcher(ls, local_files_root=root).fetch("/data/local-files/?x=1")
    with pytest.raises(MediaError, match="larger than the limit of 10 bytes"):
        fetcher(ls, local_files_root=root, max_bytes=10).fetch("/data/local-files/?d=images/sub/c.png")


def test_local_files_without_root_download_from_ls(ls: FakeLabelStudio) -> None:
    assert fetcher(ls).fetch("/data/local-files/?d=images/a.png").size == (8, 6)
    assert ls.requests[0].query == {"d": ["images/a.png"]} and ls.auth_headers() == [f"Token {TOKEN}"]


# --- limits and failures -------------------------------------------------------------------------------------------

def test_byte_limit_from_content_length_and_while_streaming(ls: FakeLabelStudio, other: Server) -> None:
    big = b"\x89PNG" + bytes(5000)
    other.route("/declared.png", body=big)
    other.route("/streamed.png", body=big, headers={"Content-Length": None})
    images = fetcher(ls, allowed_hosts=[_host_port(other)], max_bytes=1000)
    for path in ("/declared.png", "/streamed.png"):
        with pytest.raises(MediaError, match="larger than the limit of 1,000 bytes") as info:
            images.fetch(other.url + path)
        assert (info.value.status, info.value.code) == (422, "image_too_large")


def test_timeout_and_unreachable(ls: FakeLabelStudio, other: Server) -> None:
    def slow(request: Request) -> tuple[int, dict[str, Any], bytes]:
        time.sleep(1.5)
        return 200, {}, PNG
    other.routes["/slow.png"] = slow
    with pytest.raises(MediaError, match="timed out after 0.5 s") as info:
        fetcher(ls, allowed_hosts=[_host_port(other)], timeout=0.5).fetch(other.url + "/slow.png")
    assert (info.value.status, info.value.code) == (502, "media_timeout")
    with pytest.raises(MediaError, match="cannot download") as info:
        fetcher(ls, allowed_hosts=["127.0.0.1"]).fetch("http://127.0.0.1:9/a.png")
    assert (info.value.status, info.value.code) == (502, "media_unreachable")


def test_http_errors(ls: FakeLabelStudio) -> None:
    with pytest.raises(MediaError, match="HTTP 404 .* does not exist") as info:
        fetcher(ls).fetch("/data/upload/1/missing.png")
    assert info.value.code == "image_not_found"
    ls.route("/broken", status=500)
    with pytest.raises(MediaError, match="HTTP 500") as info:
        fetcher(ls).fetch("/broken")
    assert info.value.status == 502


def test_unsupported_urls(ls: FakeLabelStudio) -> None:
    for url in ("ftp://host/a.png", "images/a.png", "file:///etc/passwd", "  "):
        with pytest.raises(MediaError) as info:
            fetcher(ls).fetch(url)
        assert info.value.status == 422
    no_ls = ImageFetcher(None, None, max_bytes=1000, max_pixels=1000, timeout=1)
    with pytest.raises(MediaError, match="no Label Studio URL is known"):
        no_ls.fetch("/data/upload/1/a.png")


def test_secrets_in_query_strings_stay_out_of_messages(ls: FakeLabelStudio, other: Server) -> None:
    with pytest.raises(MediaError) as info:
        fetcher(ls, allowed_hosts=[_host_port(other)]).fetch(other.url + "/missing.png?X-Amz-Signature=topsecret")
    assert "topsecret" not in info.value.message


# --- decoding ------------------------------------------------------------------------------------------------------

def _with_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR claims another size (valid CRC), as a decompression bomb would."""
    ihdr = data[12:29]
    body = ihdr[:4] + struct.pack(">II", width, height) + ihdr[12:]
    return data[:12] + body + struct.pack(">I", zlib.crc32(body)) + data[33:]


def test_pixel_limit_and_decompression_bombs() -> None:
    with pytest.raises(MediaError, match="8x6 = 48 pixels, more than the limit of 40") as info:
        decode_image(PNG, max_pixels=40)
    assert info.value.code == "image_too_large"
    with pytest.raises(MediaError, match="60,000x60,000|60000x60000|too large to decode") as info:
        decode_image(_with_size(PNG, 60_000, 60_000), max_pixels=10**12)
    assert info.value.code == "image_too_large"


NOISE_PNG = image_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)), "PNG")
NOISE_JPEG = image_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)), "JPEG")


@pytest.mark.parametrize("data,message", [
    (b"", "empty"),
    (b"<html><body>login required</body></html>", "not an image"),
    (NOISE_PNG[: len(NOISE_PNG) // 2], "corrupt or truncated"),
    (NOISE_PNG[:100] + bytes(200) + NOISE_PNG[300:], "corrupt or truncated"),
    (NOISE_JPEG[:40], "corrupt or truncated"),
    (PNG[:20], "corrupt or truncated"),
], ids=["empty", "html", "truncated-png", "damaged-png", "truncated-jpeg", "png-header-only"])
def test_corrupt_and_non_images(data: bytes, message: str) -> None:
    with pytest.raises(MediaError, match=message) as info:
        decode_image(data, max_pixels=10**6)
    assert info.value.status == 422


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    data = image_bytes(Image.new("RGB", (40, 20), (0, 0, 255)), "JPEG", exif=exif)
    image = decode_image(data, max_pixels=10**6)
    assert image.size == (20, 40) and image.mode == "RGB"


@pytest.mark.parametrize("image,fmt,expected", [
    (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
    (Image.fromarray(np.full((4, 4), 65535, np.uint16)), "PNG", (255, 255, 255)),
    (Image.fromarray(np.full((4, 4), 32896, np.uint16)), "PNG", (128, 128, 128)),
    (Image.new("LA", (4, 4), (0, 0)), "PNG", (255, 255, 255)),  # fully transparent: composited on white
    (Image.new("RGBA", (4, 4), (255, 0, 0, 255)), "PNG", (255, 0, 0)),
    (Image.new("L", (4, 4), 77), "PNG", (77, 77, 77)),
    (Image.new("1", (4, 4), 1), "PNG", (255, 255, 255)),
])
def test_modes_become_8bit_rgb(image: Image.Image, fmt: str, expected: tuple[int, int, int]) -> None:
    result = decode_image(image_bytes(image, fmt), max_pixels=10**6)
    assert result.mode == "RGB" and result.size == (4, 4)
    assert all(abs(a - b) <= 3 for a, b in zip(result.getpixel((1, 1)), expected))


def test_palette_with_transparency_and_animation_first_frame() -> None:
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    decoded = decode_image(image_bytes(palette, "PNG", transparency=0), max_pixels=10**6)
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    frames = [Image.new("RGB", (6, 6), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    first = decode_image(gif, max_pixels=10**6)
    assert first.mode == "RGB" and first.getpixel((2, 2))[0] > 200 and first.getpixel((2, 2))[1] < 50
